"""Per-cell latency of the shipped int8 model, one thread, single and batched.

    python tests/benchmarks/bench_model.py [--model models/cellnet_int8.tflite] [--runs 200]

Prints ms per call and per cell for batch sizes 1 and 64 on real fixture cells, and the
Keras/float32/int8 accuracy table from the model card. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.classifier import make_interpreter  # noqa: E402
from device.imageio import iter_image_files, read_rgb  # noqa: E402
from device.preprocess import prepare_batch  # noqa: E402


def bench(model: Path, batch: np.ndarray, runs: int) -> tuple[float, float, str]:
    interp, rt = make_interpreter(model, threads=1)
    d = interp.get_input_details()[0]
    interp.resize_tensor_input(d["index"], list(batch.shape))
    interp.allocate_tensors()
    interp.set_tensor(d["index"], batch)
    for _ in range(10):
        interp.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), float(np.percentile(times, 95)), rt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "cellnet_int8.tflite"))
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    model = Path(args.model)
    card = json.loads(model.with_suffix(".json").read_text())
    size = card["input"]["shape"][1]
    files = iter_image_files([ROOT / "tests" / "fixtures" / "nih_cells"])
    cells = prepare_batch([read_rgb(f) for f in files], size)
    reps = int(np.ceil(64 / len(cells)))
    cells64 = np.concatenate([cells] * reps)[:64]
    print(f"model {model.name}: {model.stat().st_size} bytes, input {size}px {card['input']['dtype']}")
    for n in (1, 64):
        med, p95, rt = bench(model, cells64[:n], args.runs)
        print(f"batch {n:3d} ({rt}, 1 thread): {med:.3f} ms/call median, {p95:.3f} p95 -> {med / n:.4f} ms/cell")
    m = card.get("metrics", {})
    print("\nvalidation patients (threshold 0.5):   accuracy  sens    spec    AUC")
    for k in ("keras", "float32", "int8"):
        if k in m:
            print(f"  {k:8s}                           {m[k]['accuracy']:.4f}  {m[k]['sensitivity']:.4f}  "
                  f"{m[k]['specificity']:.4f}  {m[k]['auc']:.4f}")
    if "int8_at_threshold" in m:
        t = m["int8_at_threshold"]
        print(f"  int8 @ {t['threshold']:.3f}                      {t['accuracy']:.4f}  {t['sensitivity']:.4f}  "
              f"{t['specificity']:.4f}  FP rate {t['false_positive_rate']:.4f}")


if __name__ == "__main__":
    main()
