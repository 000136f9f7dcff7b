"""Speed of red-cell segmentation on one 1280x960 field, on one core.

Not a pytest test: run it as a script. It resizes a fixture field (or the image given) to 1280x960,
pins OpenCV to one thread, segments it ``--runs`` times after a warm-up, and prints the median and
minimum milliseconds per stage and in total.

    python tests/benchmarks/bench_segment.py [--image PATH] [--runs 20] [--hint]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from device.imageio import read_rgb  # noqa: E402
from device.segment import SegmentParams, segment_cells  # noqa: E402

DEFAULT_IMAGE = ROOT / "tests" / "fixtures" / "fields" / "images" / "00d04a90-80e5-4bce-9511-1b64eabb7a47.webp"
FIELD_SIZE = (1280, 960)  # the Pi camera frame the 150 ms pipeline budget is set for


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="field image (resized to 1280x960)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument(
        "--hint", action="store_true",
        help="pass the cell diameter as a hint (fixed optics), skipping the per-field scale search",
    )
    args = ap.parse_args(argv)

    cv2.setNumThreads(1)
    image = cv2.resize(read_rgb(args.image), FIELD_SIZE, interpolation=cv2.INTER_AREA)
    params = SegmentParams()
    first = segment_cells(image, params)  # warm-up (allocations, OpenCV dispatch)
    if args.hint:
        params = SegmentParams(cell_diameter_hint_px=first.cell_diameter_px)
    runs = [segment_cells(image, params) for _ in range(args.runs)]

    stages = list(runs[0].timing_ms)
    print(f"image {args.image.name} resized to {FIELD_SIZE[0]}x{FIELD_SIZE[1]}, {len(runs[0].cells)} cells, "
          f"cell diameter {runs[0].cell_diameter_px:.1f} px, {args.runs} runs, cv2 threads "
          f"{cv2.getNumThreads()}{', diameter hint' if args.hint else ''}")
    print(f"{'stage':<12} {'median ms':>10} {'min ms':>8}")
    for stage in stages:
        vals = [r.timing_ms.get(stage, 0.0) for r in runs]
        print(f"{stage:<12} {statistics.median(vals):>10.1f} {min(vals):>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
