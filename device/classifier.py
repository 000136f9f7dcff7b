"""Cell classification with a TFLite interpreter (never TensorFlow on the device).

The interpreter is built once, its tensor indices cached, and a whole field's cells go through it
in fixed-size batches.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from device.model_card import SCORE_ULPS, ModelCard, ModelError, check_details, code_scores, load_card

logger = logging.getLogger(__name__)

RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def _interpreter_class(runtime: str):
    if runtime == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter
    elif runtime == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter
    elif runtime == "tensorflow":
        from tensorflow.lite import Interpreter  # last resort: a training machine
    else:
        raise ValueError(f"unknown runtime {runtime!r}")
    return Interpreter


def make_interpreter(model_path: str | Path, threads: int = 1, runtimes: tuple[str, ...] = RUNTIMES):
    """Build a TFLite interpreter with the first runtime that actually works.

    Each candidate is checked by creating an interpreter and allocating its tensors: tflite-runtime
    imports fine under numpy 2 and only fails then.

    Returns:
        ``(interpreter, runtime_name)``.
    """
    errors = []
    for rt in runtimes:
        try:
            cls = _interpreter_class(rt)
            interp = cls(model_path=str(model_path), num_threads=threads)
            interp.allocate_tensors()
            return interp, rt
        except ImportError as exc:
            errors.append(f"{rt}: not installed ({exc})")
        except Exception as exc:  # a runtime that imports but cannot run this model/numpy
            errors.append(f"{rt}: {type(exc).__name__}: {exc}")
    raise ModelError(f"no TFLite runtime could load {model_path}: " + "; ".join(errors))


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """real = scale * (q - zero_point). The int64 cast keeps uint8 - zero_point from wrapping."""
    if scale == 0.0:  # float tensor: not quantised
        return q.astype(np.float64)
    return scale * (q.astype(np.int64) - zero_point)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """q = round(x / scale) + zero_point, clipped to the dtype's range."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


class CellClassifier:
    """A TFLite cell classifier checked against its model card.

    Args:
        model_path: the ``.tflite`` file; its card is the ``.json`` beside it.
        threads: interpreter threads (1 on the Pi leaves a core for the camera and the page).
        threshold: operating threshold; None takes the card's.
        max_batch: most cells per interpreter call (a field rarely has more; bounds memory).
        runtimes: runtimes to try, in order.
    """

    def __init__(self, model_path: str | Path, threads: int = 1, threshold: float | None = None,
                 max_batch: int = 512, runtimes: tuple[str, ...] = RUNTIMES):
        self.model_path = Path(model_path)
        self.card: ModelCard = load_card(self.model_path)
        self.threshold = float(threshold if threshold is not None else self.card.threshold)
        if not 0.0 < self.threshold < 1.0:  # nan too: it would flag nothing
            raise ValueError(f"threshold {threshold!r} is not a probability in (0, 1)")
        self.interpreter, self.runtime = make_interpreter(self.model_path, threads, runtimes)
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        check_details(self.card, "input", inp)
        check_details(self.card, "output", out)
        self.input_size_px = int(inp["shape"][1])
        self._in_index, self._out_index = inp["index"], out["index"]
        self._in_dtype = inp["dtype"]
        self._in_q = inp["quantization"]
        self._out_q = out["quantization"]
        self._p_of_code = self._score_table(np.dtype(out["dtype"]))
        self.max_batch = max_batch
        self._batch = int(inp["shape"][0])
        # One interpreter: resizing its input for one caller's batch while another's is in it raised
        # "There is at least 1 reference to internal data"; calls take turns.
        self._lock = threading.Lock()
        logger.info("model %s (sha256 %s…) on %s, threshold %.3f, input %dpx %s",
                    self.card.name, self.card.sha256[:12], self.runtime, self.threshold,
                    self.input_size_px, np.dtype(self._in_dtype).name)

    @property
    def sha256(self) -> str:
        return self.card.sha256

    def _ensure_batch(self, n: int) -> None:
        """Size the input tensor for n cells: a whole field in one call, no padded slots.

        Shrinking costs ~0.1 ms, growing a few ms (allocation); both far less than classifying
        padding cells (~0.3 ms each).
        """
        if n != self._batch:
            self.interpreter.resize_tensor_input(self._in_index, [n, self.input_size_px, self.input_size_px, 3])
            self.interpreter.allocate_tensors()
            self._batch = n

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """p_infected for an ``(n, s, s, 3)`` uint8 RGB batch made by :func:`device.preprocess.prepare_cell`."""
        n = len(batch)
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        if batch.dtype != np.uint8 or batch.shape[1:] != (self.input_size_px, self.input_size_px, 3):
            raise ValueError(f"expected (n, {self.input_size_px}, {self.input_size_px}, 3) uint8, "
                             f"got {batch.shape} {batch.dtype}")
        out = np.empty(n, dtype=np.float64)
        with self._lock:
            for start in range(0, n, self.max_batch):
                chunk = batch[start : start + self.max_batch]
                self._ensure_batch(len(chunk))
                self.interpreter.set_tensor(self._in_index, self._to_input(chunk))
                self.interpreter.invoke()
                raw = self.interpreter.get_tensor(self._out_index)[:, 0]  # get_tensor gives a copy
                out[start : start + len(chunk)] = (
                    self._to_probability(raw) if self._p_of_code is None
                    else self._p_of_code[raw.astype(np.int64) - np.iinfo(raw.dtype).min])
        return out

    def _score_table(self, dtype: np.dtype) -> np.ndarray | None:
        """p_infected of every code of an 8-bit output, computed once; None for a float output.

        The logit's sigmoid rounds its last bit differently on different CPUs (numpy's AVX-512 exp on an
        x86-64 machine, libm on a Pi's ARM core: 20 of the 256 codes of the model shipped before
        2026-12-01). The card's threshold is itself such a score, so a cell at exactly the threshold's code
        could be flagged on one machine and not on the other. A code whose score lies within a few ulps of
        one of the card's thresholds (its own and its operating curve's) takes that threshold's exact value.
        """
        table = code_scores(dtype, *self._out_q, self.card.output_kind)
        if table is None:
            return None
        curve = self.card.data.get("operating_curve") or []
        for t in {float(self.card.threshold), *(float(r["threshold"]) for r in curve)}:
            table[np.abs(table - t) <= SCORE_ULPS * np.spacing(t)] = t
        table.flags.writeable = False
        return table

    def _to_input(self, chunk: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self._in_dtype)
        scale, zp = self._in_q
        if dtype == np.float32:
            return chunk.astype(np.float32)
        if dtype == np.uint8 and scale == 1.0 and zp == 0:
            return chunk  # raw pixels are the quantised input
        return quantize(chunk.astype(np.float64), scale, zp, dtype)

    def _to_probability(self, raw: np.ndarray) -> np.ndarray:
        v = dequantize(raw, *self._out_q)
        if self.card.output_kind == "logit":
            return 1.0 / (1.0 + np.exp(-v))
        return np.clip(v, 0.0, 1.0)
