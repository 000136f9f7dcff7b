"""End-to-end field analysis speed and memory on one core.

    python tests/benchmarks/bench_field.py [--runs 20] [--image PATH]

A 1280x960 field (a bundled BBBC041 sample resized, or --image) through the whole pure pipeline:
quality gate, segmentation, crops, one batched int8 classification. Prints each stage (median ms)
and, from a separate `python -m device analyze` process, its peak RSS. A benchmark: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import cv2

    from device.analysis import analyze_field
    from device.classifier import CellClassifier
    from device.imageio import read_rgb

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--image", default=str(sorted((ROOT / "device" / "samples").glob("*.jpg"))[0]))
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core, as the target says
    rgb = read_rgb(args.image)
    if rgb.shape[:2] != (960, 1280):
        rgb = cv2.resize(rgb, (1280, 960), interpolation=cv2.INTER_AREA)
    clf = CellClassifier(ROOT / "models" / "cellnet_int8.tflite", threads=1)
    analyze_field(rgb, clf)  # warm-up
    stages: dict[str, list[float]] = {}
    totals = []
    for _ in range(args.runs):
        t = time.perf_counter()
        res = analyze_field(rgb, clf)
        totals.append((time.perf_counter() - t) * 1000)
        for k, v in res.timing_ms.items():
            stages.setdefault(k, []).append(v)
    print(f"field {Path(args.image).name} at 1280x960: {res.rbc_count} cells, {res.infected_count} flagged, "
          f"rejected={res.rejected}")
    for k, v in stages.items():
        print(f"  {k:12s} {statistics.median(v):7.1f} ms median")
    print(f"  end to end   {statistics.median(totals):7.1f} ms median, {max(totals):.1f} max over {args.runs} runs")

    with tempfile.TemporaryDirectory() as td:
        img = Path(td) / "field.png"
        cv2.imwrite(str(img), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-m", "device", "analyze", str(img), str(ROOT / "device" / "samples"),
                        "--slide", "--json", str(Path(td) / "out.json")], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak RSS of `python -m device analyze` on 5 fields: {max(peak, before) / 1024:.0f} MB")


if __name__ == "__main__":
    main()
