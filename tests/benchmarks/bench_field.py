"""End-to-end field analysis speed and memory on one core.

    python tests/benchmarks/bench_field.py [--runs 20] [--image PATH] [--large-mp 12,24,48]

A 1280x960 field (a bundled BBBC041 sample resized, or --image) through the whole pure pipeline:
quality gate, segmentation, crops, one batched int8 classification. Prints each stage (median ms)
and, from a separate `python -m device analyze` process, its peak RSS, on the 5 bundled fields and on
large camera JPEGs (the field enlarged). A benchmark: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--large-mp", type=lambda t: [int(v) for v in t.split(",") if v], default=[12, 24, 48],
                    help="peak RSS on camera JPEGs of these sizes, MP (default 12,24,48; '' for none)")
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
        peak, _ = _analyze_peak_mb(img, ROOT / "device" / "samples", "--slide", "--json", str(Path(td) / "out.json"))
    print(f"peak RSS of `python -m device analyze` on 5 fields: {peak:.0f} MB")
    # large camera JPEGs (the sample enlarged, quality 92), each in a process of its own
    bgr = cv2.imread(args.image)
    with tempfile.TemporaryDirectory() as td:
        for mp in args.large_mp:
            s = (mp * 1e6 / (bgr.shape[0] * bgr.shape[1])) ** 0.5
            big = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
            img = Path(td) / f"field_{mp}mp.jpg"
            cv2.imwrite(str(img), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
            del big
            peak, wall = _analyze_peak_mb(img, "--json", str(Path(td) / "o.json"))
            read_at = json.loads((Path(td) / "o.json").read_text())["images"][0]["read_at"]
            print(f"peak RSS of `python -m device analyze` on one {mp} MP JPEG: {peak:.0f} MB "
                  f"(read at {read_at:g}, {wall:.1f} s)")
            img.unlink()


# The child's own high-water mark (VmHWM, of its own memory since exec). ru_maxrss is no use here: Linux
# carries it over exec from the forked copy of this process, which holds the classifier and the images, so
# it read this process's size (279 MB for a 48 MP field whose analysis peaks at 194 MB).
_PEAK_PROBE = ("import sys; from device.cli import main; rc = main(sys.argv[1:]); "
               "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr); "
               "sys.exit(rc)")


def _analyze_peak_mb(*args) -> tuple[float, float]:
    """Run `python -m device analyze ARGS` in a process of its own: (its peak RSS in MB, wall seconds)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PEAK_PROBE, "analyze", *map(str, args)], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    hwm = next(line for line in reversed(r.stderr.splitlines()) if line.startswith("VmHWM"))
    return int(hwm.split()[1]) / 1024, wall

if __name__ == "__main__":
    main()
