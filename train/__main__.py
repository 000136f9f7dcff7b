"""python -m train --data DIR --out RUN_DIR: train the cell classifier, split by patient."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import sys
import time
from pathlib import Path

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    ap.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/ (+ patients.csv)")
    ap.add_argument("--out", required=True, help="run folder to write (created)")
    # The defaults are the shipped model's recipe (README, "Shipped model"). 48 px / width 8 was the best
    # of 64/16, 48/12, 56/8 and 48/8 on the validation patients, and the only one under 0.2 ms per cell.
    ap.add_argument("--size", type=int, default=48, help="model input side in px (default 48)")
    ap.add_argument("--width", type=int, default=8, help="filters of the first conv (default 8)")
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--patience", type=int, default=5, help="early-stopping patience (--schedule plateau)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--schedule", choices=("plateau", "cosine"), default="cosine",
                    help="cosine (default): warm up, then decay to 1%% over --epochs; plateau: cut the rate on a "
                         "flat monitor loss and stop early (needs --monitor-fraction > 0 and --average-last 0)")
    ap.add_argument("--average-last", type=int, default=8, metavar="N",
                    help="with --schedule cosine: the model is the average of the weights at the end of the last N "
                         "epochs (stochastic weight averaging; nothing is selected on held-out data)")
    ap.add_argument("--no-balance", action="store_true",
                    help="do not weight the classes to equal total weight (extra field crops are mostly uninfected)")
    ap.add_argument("--weight-decay", type=float, default=0.004, help="AdamW weight decay (0: plain Adam)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--colour-norm", action="store_true",
                    help="the model's first step divides each channel of a cell by its mean over the cell (grey "
                         "world): a slide's stain and light scale drop out")
    ap.add_argument("--val-fraction", type=float, default=0.15,
                    help="patients held out for validation when patients.csv has no split")
    ap.add_argument("--monitor-fraction", type=float, default=0.0,
                    help="share of training patients kept aside for early stopping and the threshold; 0 (default) "
                         "fits every training patient for a fixed --epochs (needs --schedule cosine)")
    ap.add_argument("--max-cells-per-class", type=int, default=0, help="cap per class (smoke runs)")
    ap.add_argument("--no-stain-jitter", action="store_true")
    ap.add_argument("--jitter-strength", type=float, default=0.5,
                    help="scale of the stain/colour jitter (1.0: hue 0.08, saturation/contrast 0.4/0.25, gains 0.15; "
                         "default 0.5)")
    ap.add_argument("--extra-data", action="append", default=[], metavar="DIR",
                    help="more cells in the same layout (e.g. field crops from `python -m train.fieldcrops`): "
                         "its train-split cells join training, its val-split cells are reported apart")
    ap.add_argument("--extra-positive-repeat", type=int, default=16,
                    help="each parasitized extra cell joins training this many times, each time augmented anew "
                         "(field sets have few; default 16: at 4 the model flagged 0.67 of its own training "
                         "fields' P. vivax parasite cells at its threshold)")
    args = ap.parse_args(argv)
    if args.extra_positive_repeat < 1:
        ap.error(f"--extra-positive-repeat must be at least 1, got {args.extra_positive_repeat}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.monitor_fraction == 0 or args.average_last) and args.schedule != "cosine":
        print("python -m train: --monitor-fraction 0 and --average-last need a fixed schedule: use --schedule cosine",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.data import DataError

    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except DataError as exc:
        logger.error("%s", exc)
        return 2


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import numpy as np

    from device.metrics import binary_metrics
    from train.data import DataError, list_cells, load_arrays, patient_split

    t_start = time.time()
    out = Path(args.out)
    try:  # before hours of decoding and training, not after
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"--out {out} cannot be written: {exc.strerror or exc}") from exc
    files, csv_split = list_cells(args.data)
    if args.max_cells_per_class:
        rng = random.Random(args.seed)
        capped = []
        for label in (0, 1):
            group = [f for f in files if f.label == label]
            rng.shuffle(group)
            capped.extend(sorted(group[: args.max_cells_per_class], key=lambda f: f.rel))
        files = capped
    patients = sorted({f.patient for f in files})
    split, split_source = patient_split(patients, csv_split, args.seed, args.val_fraction, args.monitor_fraction)
    train_p, monitor_p, val_p = split["train"], split["monitor"], split["val"]
    if not train_p or not val_p:
        raise DataError(f"need at least 2 patients to split by patient; found {len(patients)}")
    if (set(train_p) | set(monitor_p)) & set(val_p) or set(train_p) & set(monitor_p):  # not an assert: -O drops those
        raise DataError("a patient is on two sides of the split")
    logger.info("patients: %d train, %d monitor (early stopping), %d validation (%s)",
                len(train_p), len(monitor_p), len(val_p), split_source)

    sets = {"train": set(train_p), "monitor": set(monitor_p), "val": set(val_p)}
    extra_lists = [(extra, *list_cells(extra)) for extra in args.extra_data]
    for extra, efiles, _ in extra_lists:
        # extra cells of a validation or monitor patient (the full NIH download given as extra data) were
        # trained on: the held-out figures then were not held out
        leak = sorted({f.patient for f in efiles} & (sets["val"] | sets["monitor"]))
        if leak:
            raise DataError(f"--extra-data {extra} holds cells of held-out patients of {args.data} "
                            f"({', '.join(leak[:10])}{'...' if len(leak) > 10 else ''}): leave them out of it")
    arrays = {}
    all_skipped = []
    for name, pts in sets.items():
        sel = [f for f in files if f.patient in pts]
        x, y, kept, skipped = load_arrays(sel, args.size)
        all_skipped += skipped
        arrays[name] = (x, y, kept)
        logger.info("%s: %d cells (%d parasitized, %d uninfected), %d skipped",
                    name, len(y), int(y.sum()), int((y == 0).sum()), len(skipped))
        if name in ("train", "val") and (len(y) == 0 or y.min() == y.max()):
            # accuracy, sensitivity and AUC need both classes on the validation side too
            raise DataError(f"{'training' if name == 'train' else 'validation'} patients hold "
                            f"{'no readable cells' if len(y) == 0 else 'only one class'} in {args.data} "
                            f"({', '.join(sorted(pts))[:200]}); give a patients.csv with a val split")
        if name == "monitor" and args.monitor_fraction > 0 and len(y) == 0:
            # early stopping would otherwise select on the validation patients, whose figures are then
            # no longer held out (it silently did)
            raise DataError(f"--monitor-fraction {args.monitor_fraction:g} left no readable early-stopping cells "
                            f"({len(train_p)} training patient(s) besides the validation ones): use "
                            "--monitor-fraction 0 (a fixed schedule) or give more patients")

    extra_val = {}
    for extra, efiles, esplit in extra_lists:
        etrain = [f for f in efiles if esplit.get(f.patient, "train") != "val"]
        eval_ = [f for f in efiles if esplit.get(f.patient) == "val"]
        xe, ye, _, _ = load_arrays(etrain, args.size)
        pos = ye == 1
        reps = args.extra_positive_repeat
        xe = np.concatenate([xe] + [xe[pos]] * (reps - 1))
        ye = np.concatenate([ye] + [ye[pos]] * (reps - 1))
        x, y, kept = arrays["train"]
        arrays["train"] = (np.concatenate([x, xe]), np.concatenate([y, ye]), kept)
        logger.info("extra %s: %d training cells (%d parasitized, x%d), %d held out", extra, len(ye),
                    int(ye.sum()), reps, len(eval_))
        if eval_:
            extra_val[str(extra)] = load_arrays(eval_, args.size)[:2]

    split_doc = {
        "data": str(Path(args.data).resolve()),
        "source": split_source,
        "seed": args.seed,
        "patients": {k: sorted(v) for k, v in sets.items()},
        "cells": {k: len(v[1]) for k, v in arrays.items()},
        "skipped": [{"file": r, "reason": e} for r, e in all_skipped],
        "extra_data": [str(Path(e).resolve()) for e in args.extra_data],
        # the field split the extra crops were cut with, as trained on: cut again with another seed, the
        # folder's fields_split.json changes, and convert would list other fields as the training ones
        "extra_fields_split": {str(Path(e).resolve()): _fields_split(e) for e in args.extra_data},
    }
    (out / "split.json").write_text(json.dumps(split_doc, indent=2))

    history, model = fit(args, arrays)
    model.save(out / "model.keras")

    xv, yv, kept_v = arrays["val"]
    p_val = predict_proba(model, xv)
    metrics = binary_metrics(yv, p_val, 0.5)
    metrics["per_patient"] = per_patient(kept_v, yv, p_val)
    metrics["epochs_run"] = len(history["loss"])
    metrics["train_seconds"] = round(time.time() - t_start, 1)
    metrics["input_size_px"] = args.size
    metrics["width"] = args.width
    metrics["params"] = int(model.count_params())
    for name, (xe, ye) in extra_val.items():
        metrics.setdefault("extra_val", {})[name] = binary_metrics(ye, predict_proba(model, xe), 0.5)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    (out / "command.txt").write_text("python -m train " + shlex.join(argv) + "\n")
    np.save(out / "val_p.npy", p_val)

    from train.report import write_reports

    write_reports(out, history, yv, p_val, xv, kept_v)
    logger.info("validation patients: accuracy %.4f, sensitivity %.4f, specificity %.4f, AUC %.4f "
                "(threshold 0.5, n=%d) in %.0f s", metrics["accuracy"], metrics["sensitivity"],
                metrics["specificity"], metrics["auc"], metrics["n"], metrics["train_seconds"])
    return 0


def _fields_split(extra: str | Path) -> dict | None:
    """The field images an extra crop folder's training and held-out cells were cut from
    (``fields_split.json``, written by ``train.fieldcrops``), or None for a folder without one."""
    fs = Path(extra) / "fields_split.json"
    if not fs.is_file():
        return None
    doc = json.loads(fs.read_text())
    return {"source": doc.get("source"), "seed": doc.get("seed"), "train": sorted(doc.get("train", [])),
            "val": sorted(doc.get("val", []))}


def per_patient(kept, y, p) -> dict:
    import numpy as np

    out = {}
    pts = np.array([f.patient for f in kept])
    for pt in sorted(set(pts)):
        sel = pts == pt
        out[pt] = {"n": int(sel.sum()), "n_parasitized": int(y[sel].sum()),
                   "accuracy": float(((p[sel] >= 0.5) == (y[sel] == 1)).mean())}
    return out


def predict_proba(model, x):
    import numpy as np

    logits = model.predict(x.astype("float32"), batch_size=256, verbose=0)[:, 0]
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def fit(args, arrays):
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    import keras
    import numpy as np
    import tensorflow as tf

    from train.model import WeightAverage, build_model, geometric_augmenter, stain_jitter

    keras.utils.set_random_seed(args.seed)
    xt, yt, _ = arrays["train"]
    xm, ym, _ = arrays["monitor"]  # never the validation patients: refused above when empty
    aug = geometric_augmenter(args.seed)
    jitter = not args.no_stain_jitter

    def augment(x, y):
        x = aug(tf.cast(x, tf.float32), training=True)
        if jitter:
            x = stain_jitter(x, args.jitter_strength)
        return x, tf.cast(y, tf.float32)

    ds = (tf.data.Dataset.from_tensor_slices((xt, yt))
          .shuffle(len(yt), seed=args.seed, reshuffle_each_iteration=True)
          .batch(args.batch)
          .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    # Without monitor patients nothing is selected on held-out data: a fixed schedule, and the model is the
    # last epoch's weights or the mean over the last --average-last epochs.
    dm = (tf.data.Dataset.from_tensor_slices((xm.astype(np.float32), ym.astype(np.float32))).batch(256)
          if len(ym) else None)
    model = build_model(args.size, args.width, colour_norm=args.colour_norm)
    if args.schedule == "cosine":
        per_epoch = int(np.ceil(len(yt) / args.batch))
        steps = args.epochs * per_epoch
        lr = keras.optimizers.schedules.CosineDecay(0.0, steps, alpha=0.01, warmup_target=args.lr,
                                                    warmup_steps=min(steps // 10, 2 * per_epoch))
    else:
        lr = args.lr
    optimizer = (keras.optimizers.AdamW(lr, weight_decay=args.weight_decay) if args.weight_decay
                 else keras.optimizers.Adam(lr))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
                 keras.metrics.AUC(from_logits=True, name="auc")],
    )
    model.summary(print_fn=logger.info)
    if args.average_last:
        callbacks = [WeightAverage(max(0, args.epochs - args.average_last))]
    elif dm is None:
        callbacks = []
    elif args.schedule == "cosine":
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.epochs,
                                                   restore_best_weights=True)]
    else:
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-5),
        ]
    class_weight = None
    if not args.no_balance:
        n_pos = float(yt.sum())
        class_weight = {0: len(yt) / (2.0 * (len(yt) - n_pos)), 1: len(yt) / (2.0 * n_pos)}
        logger.info("class weights (equal total weight per class): %s",
                    {k: round(v, 3) for k, v in class_weight.items()})
    h = model.fit(ds, validation_data=dm, epochs=args.epochs, callbacks=callbacks, class_weight=class_weight,
                  verbose=1)
    history = {k: [float(v) for v in vals] for k, vals in h.history.items()}
    return history, model


if __name__ == "__main__":
    sys.exit(main())
