"""Conversion steps: load, calibrate, convert, measure with the device's interpreter, gate, write."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from device.classifier import CellClassifier, dequantize, make_interpreter, quantize
from device.config import THRESHOLD_SAFE_RANGE
from device.metrics import binary_metrics
from device.model_card import CLASS_ORDER, ModelError, sha256_of
from device.slide import detection_limit_fraction, wilson_interval

logger = logging.getLogger(__name__)


class ConvertError(RuntimeError):
    """Conversion refused; the message says why."""


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def extra_training_data(run_dir: Path) -> list[dict]:
    """Field-crop sets the run trained on beside the NIH cells, with the field images used."""
    sp = run_dir / "split.json"
    out = []
    for extra in (json.loads(sp.read_text()).get("extra_data", []) if sp.is_file() else []):
        fs = Path(extra) / "fields_split.json"
        if not fs.is_file():
            # without it the card would list no training fields, and evaluate-fields would score the fields
            # the model trained on as held out
            raise ConvertError(f"{run_dir} trained on extra cells from {extra}, whose fields_split.json is "
                               "missing: make them again with `python -m train.fieldcrops` (same fields, same "
                               "split) so that the card lists the field images the model trained on")
        doc = json.loads(fs.read_text())
        trained = json.loads(sp.read_text()).get("extra_fields_split", {}).get(extra)
        now = {"train": sorted(doc.get("train", [])), "val": sorted(doc.get("val", []))}
        if trained is None:
            # runs trained before the split was recorded (the shipped members): the folder's split is taken
            # as theirs; cutting the crops again with the same seed gives the same split
            logger.warning("%s did not record the field split it trained on: taking %s's (%d training fields)",
                           run_dir, fs, len(now["train"]))
        elif {k: sorted(trained.get(k, [])) for k in ("train", "val")} != now:
            moved = sorted(set(now["train"]) ^ set(trained.get("train", [])))
            raise ConvertError(f"{extra} was cut again with another field split since {run_dir} trained on it "
                               f"({len(moved)} field(s) changed sides, e.g. {', '.join(moved[:3])}): the card "
                               "would list the wrong training fields and evaluate-fields would score training "
                               "fields as held out. Cut them with the run's split (`python -m train.fieldcrops "
                               f"--seed {trained.get('seed')}`) or train again")
        out.append({"cells": extra, "fields_source": doc.get("source"), "train_images": doc.get("train", []),
                    "held_out_images": doc.get("val", [])})
    return out


def load_keras(path: Path):
    import keras

    import train.model  # noqa: F401  (registers the model's own layers, e.g. CellColourNorm, for loading)

    if not path.is_file():
        raise ConvertError(f"model not found: {path}")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ConvertError(f"{path} is not a loadable Keras model ({type(exc).__name__}: {exc})") from exc
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and isinstance(shape[1], int) and shape[1] == shape[2]
            and shape[3] == 3):
        raise ConvertError(f"{path}: expected one square RGB image input of fixed size, got {shape}")
    if len(model.outputs) != 1 or tuple(model.output_shape) != (None, 1):
        raise ConvertError(f"{path}: expected one output of one logit per cell, got {model.output_shape}")
    activation = model.layers[-1].get_config().get("activation", "linear")
    if activation not in (None, "linear"):
        # the card says kind "logit" and the device applies the sigmoid: a sigmoid head would be applied twice
        raise ConvertError(f"{path}: the last layer applies {activation!r}; the model must output the logit")
    return model


# The flips of a cell (NHWC axes: 1 turns it upside down, 2 mirrors it) and which of them --views N averages.
# The benchmarks that score views outside a model (bench_views.py, bench_field_conditions.py) use these too.
VIEW_AXES = {"as it is": (), "mirrored": (2,), "upside down": (1,), "both flips": (1, 2)}
VIEWS = {1: ("as it is",), 2: ("as it is", "mirrored"), 4: ("as it is", "mirrored", "upside down", "both flips")}


def with_views(model, views: int):
    """The model averaged over flips of each cell, in one graph: the mean logit of the cell as it is (1), and
    its mirror image (2), and its upside-down copy and both flips (4). The views live inside the model, as
    normalisation does, so the device runs the converted file as it runs any other."""
    if views == 1:
        return model
    import keras

    def flipped(name: str):
        def flip(t):
            for axis in VIEW_AXES[name]:
                t = keras.ops.flip(t, axis=axis)
            return t
        return keras.layers.Lambda(flip, name=name.replace(" ", "_"))

    inp = keras.Input(shape=model.input_shape[1:], name="cell")
    cells = [inp, *(flipped(name)(inp) for name in VIEWS[views][1:])]
    mean_logit = keras.layers.Average(name="mean_logit")([model(c) for c in cells])
    return keras.Model(inp, mean_logit, name=f"{model.name}_views")


def ensemble(models: list):
    """The mean logit of several trained models (members), in one graph: each cell passes through every
    member once. Members must take the same input; a single model is returned as it is."""
    if len(models) == 1:
        return models[0]
    import keras

    shapes = sorted({str(m.input_shape) for m in models})
    if len(shapes) > 1:
        raise ConvertError(f"ensemble members must take the same input, got {', '.join(shapes)}")
    inp = keras.Input(shape=models[0].input_shape[1:], name="cell")
    # each member under its own name (runs of one recipe share the model's name, and a graph's names are unique)
    members = [keras.Model(m.inputs[0], m.outputs[0], name=f"member_{i}") for i, m in enumerate(models, 1)]
    mean_logit = keras.layers.Average(name="mean_logit_members")([m(inp) for m in members])
    return keras.Model(inp, mean_logit, name=f"{models[0].name}_x{len(models)}")


def member_runs(model_paths: list[Path]) -> tuple[dict[str, set[str]], list[dict]]:
    """The patient split and extra training data the members share. Members trained on other splits would
    leave no patient held out from all of them, so they are refused, as are members trained on other extra
    cells (the card lists one training set)."""
    sets = patient_sets(model_paths[0])
    extra = extra_training_data(model_paths[0].parent)
    for path in model_paths[1:]:
        if patient_sets(path) != sets:
            raise ConvertError(f"{path} was trained on another patient split than {model_paths[0]}: ensemble "
                               "members must share one split (split.json), so that the held-out patients are "
                               "held out from every member")
        if extra_training_data(path.parent) != extra:
            raise ConvertError(f"{path} was trained on other extra cells than {model_paths[0]} (split.json "
                               "extra_data): ensemble members must share one training set")
    return sets, extra


def patient_sets(model_path: Path) -> dict[str, set[str]]:
    """The run's own patient split, from split.json beside the model.

    There is no fallback: which patients trained a model is a fact of its run, not something to
    recompute (a re-made split with another monitor share once took 14 trained-on patients for
    held-out ones and chose the threshold on them).
    """
    sp = model_path.parent / "split.json"
    try:
        doc = json.loads(sp.read_text())
        sets = {k: set(doc["patients"][k]) for k in ("train", "monitor", "val")}
    except FileNotFoundError:
        raise ConvertError(f"{sp} not found: convert needs the run's patient split to measure the model on "
                           "patients it never saw; convert a model.keras from `python -m train` in its run "
                           "folder") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConvertError(f"{sp} is not a readable patient split ({type(exc).__name__}: {exc})") from None
    return sets


def representative_images(x_cells: np.ndarray) -> np.ndarray:
    """Calibration cells from training patients, plus one image spanning 0..255.

    NIH pixels rarely exceed 250, so calibration alone sets the input scale to ~0.98 and raw pixels
    would be read ~2% too bright; the extra image pins the input range to the full 0..255.
    """
    span = np.zeros_like(x_cells[:1])
    span[0, 0, 0, :] = 255
    return np.concatenate([x_cells, span]).astype(np.float32)


def calibration_files(files: list, n: int, seed: int) -> list:
    """A seeded sample of ``n`` training files (sorted), so only those are decoded for calibration."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(files), size=min(n, len(files)), replace=False)
    return [files[i] for i in sorted(idx.tolist())]


def op_outputs(tflite: bytes) -> list[tuple[str, np.dtype, str]]:
    """(operation, dtype of its first output, that output's name) of every operation of a .tflite model, in
    graph order."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite)
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    return [(op["op_name"], np.dtype(tensors[op["outputs"][0]]["dtype"]), tensors[op["outputs"][0]]["name"])
            for op in interp._get_ops_details()]


def float_nodes(model, float_tflite: bytes | None = None) -> list[str]:
    """Names of the graph's tensors that the int8 model keeps in float: those of every per-cell colour norm
    (``train.model.CellColourNorm``, also inside ensemble members). In int8 its means over the 48 px square and
    its reciprocal are rounded to 1/256 of their range, so each channel of a cell is scaled a little off the
    trained value (on the shipped pair, the int8 logit's error against float had a standard deviation of 0.257
    all in int8 and 0.165 with these in float, on one draw of 2,000 training cells; the file also ran faster:
    README, Conversion).

    ``float_tflite``: the model already converted to float32 TFLite, whose tensor names are read (converted
    here when not given).

    Raises:
        ConvertError: when a colour norm layer's operations are not found by name.
    """
    import tensorflow as tf

    from train.model import CellColourNorm

    def walk(layer):
        yield layer
        for sub in getattr(layer, "layers", []):
            yield from walk(sub)

    names = {layer.name for layer in walk(model) if isinstance(layer, CellColourNorm)}
    if not names:
        return []
    ops = op_outputs(float_tflite or tf.lite.TFLiteConverter.from_keras_model(model).convert())
    outputs = [name for _, _, name in ops]

    def of_layer(name: str, layer: str) -> bool:  # the converted graph names them ".../<layer>_1/<op>"
        return f"/{layer}_1/" in name or f"/{layer}/" in name

    missing = [n for n in sorted(names) if not any(of_layer(o, n) for o in outputs)]
    if missing:  # quantised whole instead, the file would still convert, and be the worse model
        raise ConvertError(f"no operation of the colour norm ({', '.join(missing)}) found in the converted graph, "
                           "to keep in float: TensorFlow names the layers' tensors otherwise")
    return sorted(o for o in set(outputs) if any(of_layer(o, n) for n in names))


def _check_float_ops(tflite: bytes, keep_float: list[str]) -> None:
    """Every operation of ``keep_float`` gives float (or the mask's bool) and every other one int8, apart from
    the (de)quantisation between them: the quantisation debugger and ``modify_model_io_type`` are experimental
    and private TensorFlow API, and with float operations allowed, an operation that failed to quantise would
    otherwise stay float without a word."""
    wanted = set(keep_float)
    wrong = []
    for op, dtype, name in op_outputs(tflite):
        if op in ("QUANTIZE", "DEQUANTIZE"):
            continue
        ok = (np.float32, np.bool_) if name in wanted else (np.int8, np.uint8)
        if dtype not in ok:
            wrong.append(f"{op} {name} ({dtype.name})")
    if wrong:
        raise ConvertError("the int8 model came out with operations of the wrong type: " + "; ".join(wrong[:5]))


def to_tflite(model, rep: np.ndarray | None, float_tflite: bytes | None = None) -> bytes:
    """The float32 model (``rep`` None) or the int8 model calibrated on ``rep``: uint8 input (raw pixels, scale
    1), uint8 logit output, every op int8 but those of :func:`float_nodes` (``float_tflite``: the float32 model
    when already converted)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if rep is None:
        return conv.convert()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def gen():
        for i in range(len(rep)):
            yield [rep[i : i + 1]]

    conv.representative_dataset = gen
    keep_float = float_nodes(model, float_tflite)
    if not keep_float:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
        return conv.convert()
    from tensorflow.lite.python.util import modify_model_io_type  # private API, checked below with the result

    # Selective quantisation goes through the quantisation debugger (experimental; the converter has no public
    # switch for it). Its model takes and gives float; the input and output are then made uint8 as above.
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float, fully_quantize=False)
    with warnings.catch_warnings():  # the debugger runs TensorFlow's own, deprecated tf.lite.Interpreter
        warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated", UserWarning)
        debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=gen, debug_options=options)
        quantised = debugger.get_nondebug_quantized_model()
    blob = modify_model_io_type(quantised, tf.uint8, tf.uint8)
    _check_float_ops(blob, keep_float)
    return blob


def tflite_logits(blob: bytes, x: np.ndarray) -> np.ndarray:
    """The logit a .tflite model (float32, or quantised in and out) gives each cell of ``x`` (raw uint8 pixels),
    in one batched call."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=blob)
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(i["index"], [len(x), *x.shape[1:]])
    interp.allocate_tensors()
    cells = (x.astype(np.float32) if i["dtype"] == np.float32  # the device's quantisation, as CellClassifier's
             else quantize(x.astype(np.float64), *i["quantization"], i["dtype"]))
    interp.set_tensor(i["index"], cells)
    interp.invoke()
    return dequantize(interp.get_tensor(o["index"]).ravel(), *o["quantization"])


def bias_corrected(members: list, model, rep: np.ndarray, float_bytes: bytes, int8_bytes: bytes,
                   x: np.ndarray) -> tuple[bytes, dict]:
    """The int8 model converted again with its systematic logit error taken out, and what was measured.

    Int8 rounding of ``model`` (built from the Keras ``members``) shifts its logit on average, not only
    scatters it: on the shipped pair, by +0.157 on 2,000 training cells outside the calibration sample (sd 0.172),
    which flags more cells at any threshold than the trained model would. The mean error of the int8 model
    against the float32 one is measured on ``x`` (training-patient cells, never a held-out patient's) and taken
    off every member's last bias (the model's logit is their mean, so it moves by exactly that), the model
    converted again with the same calibration, and the error measured again. A shift within twice its
    standard error is noise and left alone. The members' own weights are restored afterwards.
    """
    if len(x) < 2:  # --bias-cells 0, or no training cell left beside the calibration sample
        return int8_bytes, {"cells": int(len(x)), "applied": 0.0,
                            "how": "not measured: fewer than 2 training cells outside the calibration sample"}
    ref = tflite_logits(float_bytes, x)
    err = tflite_logits(int8_bytes, x) - ref
    shift, sd = float(err.mean()), float(err.std())
    info = {"cells": int(len(x)), "mean_error_before": shift, "error_sd_before": sd, "applied": 0.0,
            "how": "the mean of (int8 logit - float32 logit) on training-patient cells outside the calibration "
                   "sample, taken off the last bias of every member and converted again with the same "
                   "calibration; left alone when within twice its standard error"}
    heads = [m.layers[-1] for m in members]
    if abs(shift) <= 2 * sd / np.sqrt(len(x)):
        logger.info("int8 logit error on %d training cells: mean %+.4f (sd %.4f), within twice its standard error: "
                    "not corrected", len(x), shift, sd)
        return int8_bytes, info
    if any(getattr(h, "bias", None) is None for h in heads):
        logger.warning("int8 logit error %+.3f not corrected: a member's last layer has no bias", shift)
        return int8_bytes, {**info, "how": "not corrected: a member's last layer has no bias"}
    saved = [h.bias.numpy() for h in heads]
    try:
        for h, b in zip(heads, saved, strict=True):
            h.bias.assign(b - shift)
        corrected = to_tflite(model, rep, float_bytes)
    finally:
        for h, b in zip(heads, saved, strict=True):
            h.bias.assign(b)
    after = tflite_logits(corrected, x) - ref
    logger.info("int8 logit error on %d training cells: mean %+.4f (sd %.4f) before, %+.4f (sd %.4f) after "
                "taking %.4f off the last bias", len(x), shift, sd, after.mean(), after.std(), shift)
    return corrected, {**info, "applied": -shift, "mean_error_after": float(after.mean()),
                       "error_sd_after": float(after.std())}


def tensor_card(detail: dict) -> dict:
    scale, zp = detail["quantization"]
    return {"shape": [int(v) for v in detail["shape"]], "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zp)}}


def make_card(name: str, tflite_path: Path, **extra) -> dict:
    interp, _ = make_interpreter(tflite_path, 1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    card = {
        "name": name,
        "file": tflite_path.name,
        "sha256": sha256_of(tflite_path),
        "size_bytes": tflite_path.stat().st_size,
        "input": {**tensor_card(inp), "channel_order": "RGB", "layout": "NHWC",
                  "preprocessing": "device.preprocess.prepare_cell: tight cell crop, black outside the "
                                   "cell mask, padded square on black, resized; raw uint8 pixels"},
        "output": {**tensor_card(out), "kind": "logit",
                   "meaning": "p_infected = sigmoid(scale * (q - zero_point))"},
        "class_order": CLASS_ORDER,
    }
    card.update(extra)
    return card


def publish(files: list[tuple[Path, bytes]]) -> None:
    """Write every file under a temp name first, then rename them all.

    A target that cannot be written (a folder in the way, a full disk) fails before any file is replaced,
    so ``models/`` never holds a new model beside an old card or without one.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            if path.is_dir():
                raise ConvertError(f"{path} is a folder; nothing written to {path.parent}")
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service reads models/ as another user
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        raise ConvertError(f"cannot write {exc.filename or 'the model'}: {exc.strerror or exc}; "
                           f"nothing replaced in {files[0][0].parent}") from exc
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def _write_float32(path: Path, data: bytes) -> bool:
    """The float32 model for comparison, beside the Keras model; not shipped, so a failure only warns."""
    try:
        publish([(path, data)])
    except ConvertError as exc:
        logger.warning("float32 model not written: %s", exc)
        return False
    return True


_GATE_SCRIPT = """
import sys
import numpy as np
from device.classifier import make_interpreter
interp, _ = make_interpreter(sys.argv[1], 1, runtimes=(sys.argv[2],))
d = interp.get_input_details()[0]
interp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
interp.invoke()
assert "tensorflow" not in sys.modules
print("ok")
"""


def runtime_gate(path: Path) -> dict:
    """Load and run the model with each deployed runtime installed here, each in a fresh process.

    A fresh process is what the device has: no TensorFlow loaded beside the runtime (two TFLite
    builds in one process can break each other, which would blame the model wrongly).
    """
    results = {}
    for rt in ("ai_edge_litert", "tflite_runtime"):
        proc = subprocess.run([sys.executable, "-c", _GATE_SCRIPT, str(path), rt], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, timeout=120)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        err = proc.stderr.strip().splitlines()
        if proc.returncode == 0 and last == "ok":
            results[rt] = "ok"
        elif any("not installed" in line for line in err):
            results[rt] = "not installed"
        else:
            results[rt] = "failed: " + (err[-1] if err else f"exit {proc.returncode}")
    return results


def _earlier_conversion(path: Path, args) -> tuple[bytes, dict, dict]:
    """An int8 file converted before, for ``--card-for``: its bytes, its int8 bias correction and how it was made,
    from the card beside it (which must be its own: same sha256). Without that card nothing says how the file
    was converted, and its correction (taken off inside the file) could not be told. The new card names the
    views, seed, calibration and bias cells given now: they must be those the file was converted with (read
    from its card's command); that the members are its own is measured (:func:`_check_same_members`)."""
    from convert.__main__ import parse_args

    if not path.is_file():
        raise ConvertError(f"--card-for {path}: no such file")
    old_card_path = path.with_suffix(".json")
    try:
        old = json.loads(old_card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"--card-for {path}: its card {old_card_path} cannot be read ({exc})") from exc
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if not isinstance(old, dict) or old.get("sha256") != sha:
        raise ConvertError(f"--card-for {path}: the card beside it is not its own (sha256 {sha[:12]}…): how the "
                           "file was converted is not known")
    if not isinstance(old.get("int8_bias_correction"), dict):
        raise ConvertError(f"--card-for {path}: its card predates the int8 bias correction; convert it again")
    # how the file was made (a card written again already names the conversion itself), and its calibration
    made = old.get("card_of_an_earlier_conversion") or {
        **{k: old.get(k) for k in ("conversion_command", "git_commit", "date")},
        "representative": (old.get("data") or {}).get("representative")}
    words = shlex.split(str(made.get("conversion_command") or ""))
    try:
        if words[:3] != ["python", "-m", "convert"]:
            raise SystemExit(2)
        then = parse_args(words[3:])
    except SystemExit:
        raise ConvertError(f"--card-for {path}: its card's conversion command cannot be read: "
                           f"{made.get('conversion_command')!r}") from None
    differ = [f"--{k.replace('_', '-')} {getattr(then, k)} (now {getattr(args, k)})"
              for k in ("views", "seed", "representative", "bias_cells") if getattr(then, k) != getattr(args, k)]
    if differ:
        raise ConvertError(f"--card-for {path}: it was converted with {', '.join(differ)}: give the same")
    return data, old["int8_bias_correction"], made


def _check_same_members(path: Path, bias: dict, float_bytes: bytes, int8_bytes: bytes, x: np.ndarray) -> None:
    """The file's int8 logit against the float32 model of the members given now, on the same bias cells as its
    conversion measured (the same seed and count): the same mean and scatter, or the members are not its own."""
    if len(x) < 2 or "error_sd_before" not in bias:
        return  # nothing was measured then (--bias-cells 0): the parity gate is all that checks them
    err = tflite_logits(int8_bytes, x) - tflite_logits(float_bytes, x)
    mean, sd = float(err.mean()), float(err.std())
    then_mean = float(bias.get("mean_error_after", bias["mean_error_before"]))
    then_sd = float(bias.get("error_sd_after", bias["error_sd_before"]))
    if abs(mean - then_mean) > 0.02 or abs(sd - then_sd) > 0.05 * then_sd:
        raise ConvertError(f"--card-for {path}: its int8 logit differs from the --model members' float32 one by "
                           f"{mean:+.4f} (sd {sd:.4f}) on the {len(x)} bias cells, where its conversion measured "
                           f"{then_mean:+.4f} (sd {then_sd:.4f}): it was not converted from these members")
    logger.info("the file's int8 logit against the members' float32 one: %+.4f (sd %.4f), as converted: %+.4f "
                "(sd %.4f)", mean, sd, then_mean, then_sd)


def chosen_threshold_fp_bound(n_fp: int, n_healthy: int) -> float:
    """The false-positive bound the slide call uses at a threshold chosen among these very cells' scores.

    :func:`choose_threshold` picks its threshold among the held-out cells' own scores, so it may sit just
    above a healthy cell's (the shipped card's, 0.96601, is the int8 step above one scored 0.96170): the
    same cells then count one false positive fewer than new healthy cells would give. The count is made
    cautious the way a conformal bound is: a threshold above the (k+1)-th highest of n exchangeable healthy
    scores, for a k fixed in advance, is passed by a new healthy cell with probability at most
    (k + 1)/(n + 1). Here k comes from the data too, so this is a correction in that direction, not a
    guarantee. The bound is the upper limit of the 95% Wilson interval of ``n_fp + 1`` in ``n_healthy + 1``,
    at every listed threshold alike (a rate that rose with the threshold would contradict itself; an admin choosing a
    threshold from the curve chooses among the same cells). Measured by a reviewer on the validation
    patients: a threshold chosen on 10 of them and its false-positive rate on the other 10 (200 splits)
    read 0.00291 on average against 0.00109 on the choosing half.
    """
    return wilson_interval(n_fp + 1, n_healthy + 1)[1]


def choose_threshold(p: np.ndarray, y: np.ndarray, n_rbc: int, lo: float, hi: float,
                     tolerance: float = 0.1) -> tuple[float, float]:
    """A threshold with a near-minimal expected slide detection limit; returns (threshold, limit).

    A threshold too low floods a healthy slide with false positives (the positive cutoff climbs);
    too high loses sensitivity. ``f`` is the upper 95% bound of the false-positive rate, so a few
    healthy cells scored confidently wrong (NIH label noise) cannot make the estimate optimistic.
    The limit is flat near its minimum, so of the thresholds within ``tolerance`` (10%) of the
    best limit the lowest is taken: the most sensitive, which keeps parasitemia estimates and the
    review gallery closest to the truth at no real cost in detection limit.
    """
    neg, pos = p[y == 0], p[y == 1]
    if len(neg) == 0 or len(pos) == 0:
        raise ConvertError("choosing a threshold needs healthy and parasitized early-stopping cells")
    candidates = np.unique(np.clip(np.concatenate([p, [lo, hi]]), lo, hi))
    limits = []
    for t in candidates:
        f = wilson_interval(int((neg >= t).sum()), len(neg))[1]
        limits.append(detection_limit_fraction(f, float((pos >= t).mean()), n_rbc))
    limits = np.asarray(limits)
    ok = np.flatnonzero(limits <= limits.min() * (1 + tolerance))
    i = int(ok[0])  # candidates are sorted ascending
    return float(candidates[i]), float(limits[i])


def parity_problem(m_keras: dict, m_int8: dict, max_drop: float) -> str | None:
    """Why the int8 model may not ship (its validation accuracy more than ``max_drop`` below the Keras
    model's), or None."""
    if m_int8["accuracy"] < m_keras["accuracy"] - max_drop:
        return (f"int8 accuracy {m_int8['accuracy']:.4f} is more than {max_drop * 100:.1f} points below the Keras "
                f"model's {m_keras['accuracy']:.4f}")
    return None


def convert(args, argv: list[str]) -> Path:
    from train.data import DataError, list_cells, load_arrays

    commit = _git_commit()  # before anything is written: a new model in models/ would read as "dirty"
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe", delete=True):
            pass
    except OSError as exc:
        raise ConvertError(f"output folder {out_dir} cannot be written ({exc.strerror or exc})") from exc
    model_paths = [Path(m) for m in args.model]
    found = [p for p in model_paths if p.is_file()]  # (a missing one: load_keras says so)
    if len({sha256_of(p) for p in found}) < len(found):  # by content: also a run copied to another folder
        raise ConvertError("the same model is given twice: ensemble members are distinct runs")
    model_path = model_paths[0]
    members = [load_keras(p) for p in model_paths]
    model = with_views(ensemble(members), args.views)
    sets, extra = member_runs(model_paths)
    size = int(model.input_shape[1])
    try:
        files, csv_split = list_cells(args.data)
    except DataError as exc:
        raise ConvertError(str(exc)) from exc
    # Validation and early-stopping patients are decoded whole (they are measured); of the training
    # patients only the calibration sample is decoded.
    train_files = [f for f in files if f.patient in sets["train"]]
    if not train_files:
        raise ConvertError(f"no training-patient cells found in {args.data} for calibration")
    arrays = {}
    for name in ("monitor", "val"):
        sel = [f for f in files if f.patient in sets[name]]
        x, y, _, _ = load_arrays(sel, size)
        arrays[name] = (x, y)
        logger.info("%s patients: %d, cells: %d", name, len(sets[name]), len(y))
    cal_files = calibration_files(train_files, args.representative, args.seed)
    x_cal, _, _, _ = load_arrays(cal_files, size)
    if len(x_cal) == 0:
        raise ConvertError(f"no readable training-patient cells in {args.data} for calibration")
    # the int8 logit's mean error is measured on other training cells than those it was calibrated on
    in_cal = set(cal_files)
    x_bias, _, _, _ = load_arrays(calibration_files([f for f in train_files if f not in in_cal], args.bias_cells,
                                                    args.seed + 1), size)
    logger.info("train patients: %d, cells: %d (%d decoded for calibration, %d for the int8 bias)",
                len(sets["train"]), len(train_files), len(x_cal), len(x_bias))
    if args.bias_cells and len(x_bias) < 2:
        logger.warning("no int8 bias correction: fewer than 2 readable training cells outside the calibration sample")
    if len(arrays["val"][1]) == 0 or len(set(arrays["val"][1].tolist())) < 2:
        raise ConvertError(f"validation patients in {args.data} need cells of both classes")
    # The threshold is chosen on held-out patients: the early-stopping ones, or -- for a model trained on
    # every training patient -- the validation patients (the card says which).
    threshold_on = "early-stopping" if len(arrays["monitor"][1]) else "validation"

    rep = representative_images(x_cal)
    float_bytes = to_tflite(model, None)
    recarded = None
    if args.card_for:
        int8_bytes, bias, recarded = _earlier_conversion(Path(args.card_for), args)
        _check_same_members(Path(args.card_for), bias, float_bytes, int8_bytes, x_bias)
        logger.info("the card of %s, converted %s (%s): measured again, not converted again", args.card_for,
                    recarded["date"], recarded["conversion_command"])
    else:
        logger.info("converting float32 and int8 (calibration: %d training cells + 1 range image)", len(rep) - 1)
        int8_bytes = to_tflite(model, rep, float_bytes)
        int8_bytes, bias = bias_corrected(members, model, rep, float_bytes, int8_bytes, x_bias)

    xv, yv = arrays["val"]
    xm, ym = arrays["monitor"] if threshold_on == "early-stopping" else (xv, yv)
    logits = model.predict(xv.astype(np.float32), batch_size=256, verbose=0)[:, 0]
    p_keras = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        results = {}
        for kind, blob in (("float32", float_bytes), ("int8", int8_bytes)):
            p = td / f"{args.name}_{kind}.tflite"
            p.write_bytes(blob)
            # a card for the device's checks, before anything is measured: what it will say is written below
            card = make_card(p.stem, p, threshold=0.5, git_commit=commit,
                             metrics={"validation": "being measured by this conversion"},
                             data={"source": str(Path(args.data).resolve())})
            (td / f"{p.stem}.json").write_text(json.dumps(card))
            try:
                clf = CellClassifier(p, threads=1)  # the device's own loader, card checks included
            except ModelError as exc:  # what the device would refuse: refused here, exit 2, nothing written
                raise ConvertError(f"the converted {kind} model fails the device's checks: {exc}") from exc
            p_val = clf.predict(xv)
            p_monitor = clf.predict(xm) if threshold_on == "early-stopping" else p_val
            results[kind] = {"path": p, "card": card, "p_val": p_val, "p_monitor": p_monitor}
        runtimes = runtime_gate(td / f"{args.name}_int8.tflite")
    # one run may be converted with several views, and be the first member of several ensembles: each keeps its
    # own float32 file (an ensemble's is named by its size and a digest of its members' paths)
    member_list = "\n".join(str(p.resolve()) for p in model_paths)
    variant = (f"_x{len(model_paths)}-{hashlib.sha256(member_list.encode()).hexdigest()[:8]}" if len(model_paths) > 1
               else "") + (f"_views{args.views}" if args.views > 1 else "")
    float_path = model_path.parent / f"{args.name.replace('_int8', '')}{variant}_float32.tflite"  # after the gates

    m_keras = binary_metrics(yv, p_keras, 0.5)
    m_float = binary_metrics(yv, results["float32"]["p_val"], 0.5)
    m_int8 = binary_metrics(yv, results["int8"]["p_val"], 0.5)
    logger.info("validation accuracy: keras %.4f, float32 %.4f, int8 %.4f (AUC %.4f / %.4f / %.4f)",
                m_keras["accuracy"], m_float["accuracy"], m_int8["accuracy"],
                m_keras["auc"], m_float["auc"], m_int8["auc"])
    problem = parity_problem(m_keras, m_int8, args.max_drop)
    if problem:
        raise ConvertError(f"parity gate: {problem}; nothing written to {out_dir}")
    failed = {rt: r for rt, r in runtimes.items() if r.startswith("failed")}
    if failed:
        raise ConvertError(f"runtime gate: {failed}; nothing written to {out_dir}")
    if runtimes.get("ai_edge_litert") != "ok":
        raise ConvertError(f"runtime gate: ai_edge_litert must run the model ({runtimes['ai_edge_litert']})")

    lo, hi = THRESHOLD_SAFE_RANGE
    threshold, limit = choose_threshold(results["int8"]["p_monitor"], ym, args.target_rbc, lo, hi)
    m_int8_thr = binary_metrics(yv, results["int8"]["p_val"], threshold)
    m_monitor = binary_metrics(ym, results["int8"]["p_monitor"], threshold)
    if threshold_on == "early-stopping":
        thr_patients = f"{len(sets['monitor'])} early-stopping patients"
        fp_patients = "early-stopping + validation patients"
    else:
        thr_patients = f"{len(sets['val'])} validation patients (the model saw every training patient)"
        fp_patients = "validation patients"
    # The slide call uses a cautious false-positive rate: the upper 95% bound over every held-out
    # healthy cell (early-stopping and validation patients), not the point estimate.
    held_out = [(results["int8"]["p_val"], yv)]
    if threshold_on == "early-stopping":
        held_out.append((results["int8"]["p_monitor"], ym))
    neg = np.concatenate([p[y == 0] for p, y in held_out])
    pos = np.concatenate([p[y == 1] for p, y in held_out])
    n_fp = int((neg >= threshold).sum())
    call_fpr = chosen_threshold_fp_bound(n_fp, len(neg))
    # the limit the slide call will give (the choice above counted the cells as they are)
    limit_at_call = detection_limit_fraction(call_fpr, m_monitor["sensitivity"], args.target_rbc)
    # The card's own threshold is listed exactly: rounded (0.9789 for 0.978875... on an earlier card) its row
    # measured another operating point (sensitivity 0.8506 for that card's 0.8543).
    curve = [{"threshold": float(t),
              "call_false_positive_rate": chosen_threshold_fp_bound(int((neg >= t).sum()), len(neg)),
              "sensitivity": float((pos >= t).mean())}
             for t in sorted({*np.round(np.linspace(lo, hi, 51), 4).tolist(), float(threshold)})]
    logger.info("threshold %.4f (%s: FP rate %.4f, sensitivity %.4f; expected slide "
                "detection limit %.3f%% at %d RBC): validation sensitivity %.4f, specificity %.4f, FP rate %.4f; "
                "call FP rate %.4f (95%% upper bound of %d + 1 in %d + 1 held-out healthy cells)",
                threshold, thr_patients,
                m_monitor["false_positive_rate"], m_monitor["sensitivity"], 100 * limit, args.target_rbc,
                m_int8_thr["sensitivity"], m_int8_thr["specificity"], m_int8_thr["false_positive_rate"],
                call_fpr, n_fp, len(neg))

    train_cmds = [(p.parent / "command.txt").read_text().strip() if (p.parent / "command.txt").is_file() else None
                  for p in model_paths]
    final = out_dir / f"{args.name}.tflite"
    float_written = _write_float32(float_path, float_bytes)
    with tempfile.TemporaryDirectory(prefix="convert-") as staged_dir:
        staged = Path(staged_dir) / final.name  # the card is made from the bytes to ship, under their final name
        staged.write_bytes(int8_bytes)
        card = make_card(
            args.name, staged,
            threshold=threshold,
            threshold_rule=(f"the lowest threshold in {lo}-{hi} whose expected slide detection limit is within "
                            f"10% of the minimum at "
                            f"{args.target_rbc} RBC — (K - n*f) / (n*s), K the positive cutoff for Poisson(n*f) at "
                            f"p<0.001 — with f the upper 95% false-positive bound as counted (not the card's call "
                            f"rate, which counts one more) and s the sensitivity on the "
                            f"{thr_patients} (int8 model); expected limit "
                            f"{100 * limit:.3f}% parasitemia, and {100 * limit_at_call:.3f}% at the card's call "
                            f"rate"),
            call_false_positive_rate=call_fpr,
            operating_curve=curve,
            members={"count": len(model_paths),
                     "models": [{"model": str(p), "training_command": c} for p, c in zip(model_paths, train_cmds,
                                                                                        strict=True)],
                     "how": "inside the model: the mean logit of these trained models (every figure on this card "
                            "is of that mean)"},
            views={"count": args.views, "views": list(VIEWS[args.views]),
                   "how": "inside the model: the mean logit of these flips of each cell (every figure on this card "
                          "is of that mean)"},
            call_false_positive_rule=(f"upper limit of the two-sided 95% Wilson interval (z = 1.96; a one-sided "
                                      f"97.5% bound) of {n_fp} + 1 false positives in {len(neg)} + 1 held-out "
                                      f"healthy cells ({fp_patients}) at the threshold: one more than counted, "
                                      f"because the threshold was chosen among these cells' scores (as a "
                                      f"conformal bound counts; every operating-curve row is counted the same "
                                      f"way)"),
            metrics={
                "validation_patients": sorted(sets["val"]),
                "keras": m_keras, "float32": m_float, "int8": m_int8,
                "int8_at_threshold": m_int8_thr,
                "threshold_patients_int8_at_threshold": m_monitor,
            },
            data={"source": str(Path(args.data).resolve()),
                  "extra_training_data": extra,
                  "patients": {k: len(v) for k, v in sets.items()},
                  "cells": {"train": len(train_files), **{k: int(len(v[1])) for k, v in arrays.items()}},
                  "representative": recarded["representative"] if recarded else
                  f"{len(rep) - 1} training-patient cells + 1 image spanning 0..255"},
            int8_bias_correction=bias,
            **({"card_of_an_earlier_conversion": recarded} if recarded else {}),
            runtimes=runtimes,
            training_command=train_cmds[0] if len(train_cmds) == 1 else train_cmds,
            conversion_command="python -m convert " + shlex.join(argv),
            git_commit=commit,
            date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            float32_model=str(float_path) if float_written else None,
        )
    publish([(final, int8_bytes), (out_dir / f"{args.name}.json", (json.dumps(card, indent=2) + "\n").encode())])
    logger.info("wrote %s (%d bytes, sha256 %s) and its card", final, card["size_bytes"], card["sha256"][:16])
    return final
