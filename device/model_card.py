"""The model card: a JSON file beside every ``.tflite`` that states the model's contract.

The device reads it once at start-up and refuses a model whose card is missing, whose sha256 differs
from the file, or whose interpreter input/output details contradict the card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

CLASS_ORDER = ["uninfected", "parasitized"]


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
        return self.data["output"].get("kind", "probability")

    @property
    def input_size_px(self) -> int:
        return int(self.data["input"]["shape"][1])

    @property
    def false_positive_rate(self) -> float | None:
        """False-positive rate per healthy cell at the card threshold used for the slide call.

        The card's ``call_false_positive_rate`` is the upper 95% bound measured on held-out healthy
        cells, so that a negative slide stays negative.
        """
        v = self.data.get("call_false_positive_rate")
        if v is None:
            v = (self.data.get("metrics", {}).get("int8_at_threshold") or {}).get("false_positive_rate")
        return float(v) if v is not None else None

    def false_positive_rate_at(self, threshold: float) -> float | None:
        """Call false-positive rate at another threshold (an admin may move it within the safe range).

        Read from the card's ``operating_curve`` at the nearest listed threshold at or below the
        one asked for (a lower threshold has at least as many false positives: the cautious side).
        """
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


REQUIRED_KEYS = ("name", "sha256", "input", "output", "class_order", "threshold")


def load_card(model_path: str | Path, *, check_sha: bool = True) -> ModelCard:
    """Read and check the card beside ``model_path``. Raises :class:`ModelError` saying what is wrong."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file missing: {model_path}")
    cp = card_path_for(model_path)
    if not cp.is_file():
        raise ModelError(f"model card missing: {cp} (every .tflite ships with its .json card)")
    try:
        data = json.loads(cp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card unreadable: {cp} ({exc})") from exc
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelError(f"model card {cp} lacks {', '.join(missing)}")
    if data["class_order"] != CLASS_ORDER:
        raise ModelError(f"model card {cp}: class order {data['class_order']} is not {CLASS_ORDER}")
    if not 0.0 < float(data["threshold"]) < 1.0:
        raise ModelError(f"model card {cp}: threshold {data['threshold']} outside (0, 1)")
    if check_sha:
        actual = sha256_of(model_path)
        if actual != data["sha256"]:
            raise ModelError(
                f"sha256 of {model_path} is {actual[:16]}…, the card says {str(data['sha256'])[:16]}…: "
                "the model file was changed or corrupted"
            )
    return ModelCard(cp, data)


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
    if problems:
        raise ModelError(f"model {which} contradicts its card {card.path}: " + "; ".join(problems))
