"""What averaging flipped views of each cell would buy, on the validation patients, with a .tflite model.

    python tests/benchmarks/bench_views.py [--data ../shared/data/nih_cells] [--model models/cellnet_int8.tflite]

For the cell as it is, its upside-down copy, its mirror image and both flips (mean of the logits), prints
the ROC AUC, the accuracy at 0.5 (a mean logit of at least 0) and the sensitivity at 0, 1, 2, 5 and 14
false positives among the healthy validation cells (the slide call works near one). A measurement, not a
test: nothing asserts. Each extra view costs one more pass of the model per cell.

``--band LO HI``: also the second (upside-down) view only for the cells whose first view scores from LO to
HI, the cells the model is least sure of, with the share of cells that needs it (what it would cost).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from convert.core import VIEW_AXES  # noqa: E402  (the flips `convert --views` builds in)
from device.classifier import CellClassifier  # noqa: E402
from device.imageio import read_rgb  # noqa: E402
from device.metrics import roc_auc  # noqa: E402
from device.preprocess import prepare_batch  # noqa: E402


def sensitivity_at(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of positives scored above the (k+1)-th highest negative: k false positives allowed."""
    neg = np.sort(scores[~y])[::-1]
    return float((scores[y] > neg[k]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nih_cells"))
    ap.add_argument("--model", default=str(ROOT / "models" / "cellnet_int8.tflite"))
    ap.add_argument("--band", nargs=2, type=float, action="append", default=[], metavar=("LO", "HI"),
                    help="second view only for first-view scores in [LO, HI] (repeatable)")
    args = ap.parse_args()
    data = Path(args.data)
    with open(data / "patients.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    clf = CellClassifier(args.model)
    x = prepare_batch([read_rgb(data / r["file"]) for r in rows], clf.input_size_px)
    y = np.array([r["label"] == "parasitized" for r in rows])
    logits = {}
    for name, axes in VIEW_AXES.items():
        p = np.clip(clf.predict(np.ascontiguousarray(np.flip(x, axis=axes))), 1e-7, 1 - 1e-7)
        logits[name] = np.log(p / (1 - p))
    combos = [("1 view", ["as it is"]), ("2 views: + upside down", ["as it is", "upside down"]),
              ("2 views: + mirrored", ["as it is", "mirrored"]), ("4 views", list(VIEW_AXES))]
    ks = (0, 1, 2, 5, 14)
    n_pos = int(y.sum())
    print(f"{len(y)} validation cells ({n_pos} parasitized, {len(y) - n_pos} uninfected), {Path(args.model).name}")
    print(f"{'':24s} {'AUC':>7s} {'acc@0.5':>7s} " + " ".join(f"sens@{k}FP" for k in ks))
    for label, names in combos:
        s = np.mean([logits[n] for n in names], axis=0)
        print(f"{label:24s} {roc_auc(y, s):7.4f} {((s >= 0) == y).mean():7.4f} "
              + " ".join(f"{sensitivity_at(s, y, k):8.3f}" for k in ks))
    p0 = 1.0 / (1.0 + np.exp(-logits["as it is"]))
    for lo, hi in args.band:
        band = (p0 >= lo) & (p0 <= hi)
        s = logits["as it is"].copy()
        s[band] = (s[band] + logits["upside down"][band]) / 2
        label = f"2nd view on [{lo:g}, {hi:g}]"
        print(f"{label:24s} {roc_auc(y, s):7.4f} {((s >= 0) == y).mean():7.4f} "
              + " ".join(f"{sensitivity_at(s, y, k):8.3f}" for k in ks)
              + f"  ({band.mean():.1%} of the cells take the second view)")


if __name__ == "__main__":
    main()
