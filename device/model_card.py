"""The model card: a JSON file beside every ``.tflite`` that states the model's contract.

The device reads it once at start-up and refuses a model whose card is missing, whose sha256 differs
from the file, or whose interpreter input/output details contradict the card.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_ORDER = ["uninfected", "parasitized"]
# What the device feeds the model: raw RGB pixels, batch x height x width x channel, made by the one
# preprocessing path. A card that says otherwise describes a model the device would feed wrong input
# (RGB to a BGR model scored three parasitized cells infected all the same: nothing would show it).
INPUT_CHANNEL_ORDER = "RGB"
INPUT_LAYOUT = "NHWC"
INPUT_PREPROCESSING = "device.preprocess.prepare_cell"


SCORE_ULPS = 8  # how far (in units of the last place) a code's score may lie from a card threshold it stands for


class ModelError(RuntimeError):
    """The model cannot be used; the message says which check failed."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def code_scores(dtype: np.dtype, scale: float, zero_point: int, output_kind: str) -> np.ndarray | None:
    """p_infected of every code of an 8-bit output, lowest code first; None for a float output.

    The one place the score of an output code is worked out: the card's threshold arithmetic
    (:meth:`ModelCard.output_scores`) and the classifier's table of scores read it alike.
    """
    if np.dtype(dtype) not in (np.dtype(np.uint8), np.dtype(np.int8)):
        return None
    info = np.iinfo(dtype)
    v = float(scale) * (np.arange(info.min, info.max + 1, dtype=np.int64) - int(zero_point))
    return 1.0 / (1.0 + np.exp(-v)) if output_kind == "logit" else np.clip(v, 0.0, 1.0)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # batch dimension first (1 in the file; the device resizes it)
    dtype: str
    scale: float
    zero_point: int


@dataclass(frozen=True)
class ModelCard:
    path: Path
    data: dict

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def sha256(self) -> str:
        return self.data["sha256"]

    @property
    def threshold(self) -> float:
        return float(self.data["threshold"])

    @property
    def output_kind(self) -> str:
        return self.data["output"]["kind"]

    @property
    def input_size_px(self) -> int:
        return int(self.data["input"]["shape"][1])

    @property
    def false_positive_rate(self) -> float | None:
        """False-positive rate per healthy cell at the card threshold used for the slide call.

        The card's ``call_false_positive_rate``: the upper 95% bound measured on held-out healthy cells,
        so that a negative slide stays negative. None on a card without one (an interim card of convert's
        own checks): no slide call can be made with it. A point estimate of the rate (the card's metrics)
        never stands in: it may well be 0, and one flagged cell would then make a slide positive.
        """
        v = self.data.get("call_false_positive_rate")
        return float(v) if v is not None else None

    def output_scores(self) -> np.ndarray | None:
        """p_infected of every code of an 8-bit output, lowest code first; None for a float output.

        The only scores the model can give: a threshold anywhere between two of them flags the same cells.
        """
        out = self.data.get("output") or {}
        dtype = np.dtype(out.get("dtype") or "float32")
        if dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
            return None  # before the output's kind is read: a card's own thresholds need no output
        q = out.get("quantization") or {}
        return code_scores(dtype, float(q.get("scale", 0.0)), int(q.get("zero_point", 0)), self.output_kind)

    def effective_threshold(self, threshold: float) -> float:
        """The lowest score the model can give that a threshold flags: the threshold as far as the cells are
        concerned (0.966 flags what the card's 0.96600990 does, the scores between them being none). The
        threshold itself for a float output, or one above every score."""
        scores = self.output_scores()
        if scores is None:
            return float(threshold)
        flagged = scores[scores >= threshold - SCORE_ULPS * np.spacing(threshold)]
        if not flagged.size:
            return float(threshold)
        low = float(flagged.min())
        # the card's threshold is such a score, computed on another CPU: the last bits may differ
        return self.threshold if abs(low - self.threshold) <= SCORE_ULPS * np.spacing(self.threshold) else low

    def false_positive_rate_at(self, threshold: float) -> float | None:
        """Call false-positive rate at another threshold (an admin may move it within the safe range).

        The threshold is first taken to the score it stands for (:meth:`effective_threshold`: a threshold
        typed as shown, 0.966, is the card's own). Then read from the card's ``operating_curve`` at the
        nearest listed threshold at or below it (a lower threshold has at least as many false positives:
        the cautious side).
        """
        threshold = self.effective_threshold(threshold)
        if abs(threshold - self.threshold) < 1e-9 and self.false_positive_rate is not None:
            # the curve's thresholds are rounded (0.9789 for 0.97887...): its row at or below the card's
            # own threshold is a lower one with more false positives than the card states
            return self.false_positive_rate
        curve = self.data.get("operating_curve") or []
        below = [row for row in curve if row["threshold"] <= threshold + 1e-9]
        if not below:
            return self.false_positive_rate if abs(threshold - self.threshold) < 1e-9 else None
        return float(max(below, key=lambda row: row["threshold"])["call_false_positive_rate"])

    @property
    def training_field_images(self) -> frozenset[str]:
        """Names of the field images whose cells trained the model (``data.extra_training_data``)."""
        extra = self.data.get("data", {}).get("extra_training_data", [])
        return frozenset(str(name) for e in extra if isinstance(e, dict) for name in e.get("train_images", []))

    def spec(self, which: str) -> TensorSpec:
        d = self.data[which]
        q = d.get("quantization", {})
        return TensorSpec(tuple(int(v) for v in d["shape"]), str(d["dtype"]),
                          float(q.get("scale", 0.0)), int(q.get("zero_point", 0)))


# What a card must say (the input and output hold shape, dtype and quantisation): without its metrics, its
# data or the commit it was made from, nobody can tell what the device runs or how good it was measured.
REQUIRED_KEYS = ("name", "sha256", "input", "output", "class_order", "threshold", "metrics", "data", "git_commit")


def load_card(model_path: str | Path, *, check_sha: bool = True) -> ModelCard:
    """Read and check the card beside ``model_path``. Raises :class:`ModelError` saying what is wrong."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file missing: {model_path}")
    cp = card_path_for(model_path)
    if not cp.is_file():
        raise ModelError(f"model card missing: {cp} (every .tflite ships with its .json card)")
    try:
        data = json.loads(cp.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card unreadable: {cp} ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"model card {cp}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelError(f"model card {cp} lacks {', '.join(missing)}")
    problem = _card_problem(data)
    if problem:
        raise ModelError(f"model card {cp}: {problem}")
    if check_sha:
        actual = sha256_of(model_path)
        if actual != data["sha256"]:
            raise ModelError(
                f"sha256 of {model_path} is {actual[:16]}…, the card says {str(data['sha256'])[:16]}…: "
                "the model file was changed or corrupted"
            )
    return ModelCard(cp, data)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tensor_problem(which: str, d: object) -> str | None:
    if not isinstance(d, dict):
        return f"{which}: expected an object with shape, dtype and quantization"
    shape = d.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        return f"{which}.shape: expected a list of whole numbers, got {shape!r}"
    if not isinstance(d.get("dtype"), str):
        return f"{which}.dtype: expected a type name, got {d.get('dtype')!r}"
    q = d.get("quantization", {})
    if not isinstance(q, dict) or not all(_number(q.get(k, 0)) for k in ("scale", "zero_point")):
        return f"{which}.quantization: expected numbers scale and zero_point, got {q!r}"
    if q.get("zero_point", 0) != int(q.get("zero_point", 0)):  # read as int(): 84.9 passed as 84
        return f"{which}.quantization.zero_point {q['zero_point']!r}: expected a whole number"
    return None


def _card_problem(data: dict) -> str | None:
    """What makes a card unusable (a wrong type anywhere would crash or silently mislead later), or None."""
    if data["class_order"] != CLASS_ORDER:
        return f"class order {data['class_order']} is not {CLASS_ORDER}"
    t = data["threshold"]
    if not _number(t) or not 0.0 < t < 1.0:
        return f"threshold {t!r} is not a number in (0, 1)"
    if not isinstance(data["sha256"], str) or not isinstance(data["name"], str):
        return "name and sha256 must be strings"
    if not isinstance(data["git_commit"], str) or not data["git_commit"]:
        return f"git_commit {data['git_commit']!r}: expected the commit the model was made from"
    for key in ("metrics", "data"):
        if not isinstance(data[key], dict) or not data[key]:
            return f"{key}: expected an object (what the model was measured on and trained with), got {data[key]!r}"
    for which in ("input", "output"):
        problem = _tensor_problem(which, data[which])
        if problem:
            return problem
    inp = data["input"]
    if inp.get("channel_order") != INPUT_CHANNEL_ORDER:
        return f"input.channel_order {inp.get('channel_order')!r} is not {INPUT_CHANNEL_ORDER!r}: the device feeds RGB"
    if inp.get("layout") != INPUT_LAYOUT:
        return f"input.layout {inp.get('layout')!r} is not {INPUT_LAYOUT!r}: the device feeds NHWC"
    pre = inp.get("preprocessing")
    if not (isinstance(pre, str) and pre.split(":")[0].strip() == INPUT_PREPROCESSING):
        return (f"input.preprocessing {pre!r} does not name {INPUT_PREPROCESSING}, the only preprocessing "
                "the device has")
    if len(data["input"]["shape"]) != 4 or data["input"]["shape"][3] != 3:
        return f"input.shape {data['input']['shape']} is not [batch, side, side, 3]"
    if data["output"]["shape"][1:] != [1]:
        # one column, p_infected or its logit; a two-column softmax would be read as the wrong class
        return f"output.shape {data['output']['shape']} is not [batch, 1]"
    if data["output"].get("kind") not in ("logit", "probability"):
        return f"output.kind {data['output'].get('kind')!r} is not 'logit' or 'probability'"
    fp = data.get("call_false_positive_rate")
    if fp is not None and not (_number(fp) and 0.0 <= fp <= 1.0):
        return f"call_false_positive_rate {fp!r} is not a rate in [0, 1]"
    if fp is not None and fp == 0.0:
        # an upper confidence bound from a finite count of healthy cells is never 0, and 0 would make a
        # single flagged cell a positive slide
        return "call_false_positive_rate 0 is not an upper bound measured on healthy cells"
    curve = data.get("operating_curve", [])
    if fp is not None and not curve:
        # a card for slide calls: without its curve neither its threshold and rate nor another threshold
        # can be checked (convert always writes one beside the rate)
        return "operating_curve missing: the card's threshold and false-positive rate cannot be checked"
    if not isinstance(curve, list) or not all(
            isinstance(r, dict) and _number(r.get("threshold")) and _number(r.get("call_false_positive_rate"))
            for r in curve):
        return "operating_curve: expected rows with numbers threshold and call_false_positive_rate"
    return _curve_problem(curve, float(t), fp)


def _curve_problem(curve: list[dict], threshold: float, fp: float | None) -> str | None:
    """The card's threshold and false-positive rate must agree with its operating curve (an edited
    threshold or rate would change every slide call while the model's sha256 still matches)."""
    if not curve:
        return None
    rows = sorted(curve, key=lambda r: r["threshold"])
    ts = [float(r["threshold"]) for r in rows]
    fps = [float(r["call_false_positive_rate"]) for r in rows]
    if any(b <= a for a, b in zip(ts, ts[1:], strict=False)):
        return "operating_curve: thresholds repeat"
    if any(b > a + 1e-12 for a, b in zip(fps, fps[1:], strict=False)):
        return "operating_curve: the false-positive rate rises with the threshold"
    if fp is None:
        return None
    if threshold < ts[0] - 1e-9:
        return f"threshold {threshold:g} lies below the operating curve (from {ts[0]:g})"
    # convert lists the card's own threshold as a row: the other rows are rounded and step by ~0.01, so a
    # threshold edited within a step kept a rate that lies between its neighbours' and understated it
    own = [f for t, f in zip(ts, fps, strict=True) if abs(t - threshold) <= 1e-9]
    if not own:
        return (f"threshold {threshold:g} disagrees with the operating curve: it has no row at that threshold "
                "(an edited card, or one written by an older convert: convert the model again)")
    if abs(own[0] - fp) > 1e-12:
        return (f"call_false_positive_rate {fp:g} at threshold {threshold:g} disagrees with the operating curve "
                f"({own[0]:g} at that threshold)")
    return None


def check_details(card: ModelCard, which: str, detail: dict) -> None:
    """Compare one interpreter tensor detail (input or output) with the card."""
    spec = card.spec(which)
    shape = tuple(int(v) for v in detail["shape"])
    dtype = getattr(detail["dtype"], "__name__", str(detail["dtype"]))
    scale, zp = detail.get("quantization", (0.0, 0))
    problems = []
    if shape[1:] != spec.shape[1:]:
        problems.append(f"shape {list(shape)} vs card {list(spec.shape)}")
    if dtype != spec.dtype:
        problems.append(f"dtype {dtype} vs card {spec.dtype}")
    if abs(float(scale) - spec.scale) > 1e-6 * max(1.0, abs(spec.scale)) or int(zp) != spec.zero_point:
        problems.append(f"quantisation scale/zero point {scale}/{zp} vs card {spec.scale}/{spec.zero_point}")
    if which == "output" and dtype in ("uint8", "int8") and float(scale) > 0:
        # what the quantised output can express: a probability stays in [0, 1], a logit reaches outside it
        info = np.iinfo(dtype)
        lo, hi = float(scale) * (info.min - int(zp)), float(scale) * (info.max - int(zp))
        within_0_1 = lo >= -0.01 and hi <= 1.01
        if card.output_kind == "probability" and not within_0_1:
            problems.append(f"the card says probability, but the output spans {lo:.2f}..{hi:.2f} (a logit)")
        if card.output_kind == "logit" and within_0_1:  # an undertrained logit may span -0.4..0: still a logit
            problems.append(f"the card says logit, but the output spans {lo:.2f}..{hi:.2f} (a probability)")
    if problems:
        raise ModelError(f"model {which} contradicts its card {card.path}: " + "; ".join(problems))
