"""How well "this view overlaps a counted field" (device.camera.view_overlap) tells moved views apart.

    python tests/benchmarks/bench_overlap.py [--fields ../shared/data/fields] [--pairs 6]

Cuts pairs of 800x600 windows from each real field at random stage moves (known overlap) and pairs
of different fields, then prints the phase-correlation response of each kind, how far the estimated
overlap is from the true one, and the time of one comparison (one core). A measurement, not a test:
nothing asserts. OVERLAP_MIN_RESPONSE and the page's 50% warning were chosen from its output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.camera import (  # noqa: E402
    OVERLAP_MIN_RESPONSE,
    prepare_view,
    prepared_overlap,
    thumbnail,
    view_overlap,
)

W, H = 800, 600


def response(a: np.ndarray, b: np.ndarray) -> float:
    """The correlation response view_overlap compares with OVERLAP_MIN_RESPONSE (same high-pass)."""
    fa, fb = (x.astype(np.float32) - cv2.GaussianBlur(x.astype(np.float32), (0, 0), 6) for x in (a, b))
    h, w = a.shape
    return float(cv2.phaseCorrelate(fa, fb, cv2.createHanningWindow((w, h), cv2.CV_32F))[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=Path, default=ROOT.parent / "shared" / "data" / "fields")
    ap.add_argument("--pairs", type=int, default=6, help="moved pairs per field")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = sorted(p for p in args.fields.glob("*/images/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        paths = sorted((ROOT / "device" / "samples").glob("*.jpg"))
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    images = [im for im in images if im.shape[0] > H + 2 and im.shape[1] > W + 2]
    rng = np.random.default_rng(args.seed)
    moved = []  # (true overlap, estimated, response)
    for im in images:
        h, w = im.shape[:2]
        for _ in range(args.pairs):
            x, y = rng.integers(0, w - W), rng.integers(0, h - H)
            x2, y2 = rng.integers(0, w - W), rng.integers(0, h - H)
            a, b = thumbnail(im[y:y + H, x:x + W]), thumbnail(im[y2:y2 + H, x2:x2 + W])
            true = max(0, 1 - abs(x2 - x) / W) * max(0, 1 - abs(y2 - y) / H)
            moved.append((true, view_overlap(a, b), response(a, b)))
    different = []
    small = [thumbnail(cv2.resize(im, (W, H), interpolation=cv2.INTER_AREA)) for im in images]
    for i, a in enumerate(small):
        for j in rng.choice(len(small), min(4, len(small)), replace=False):
            if i != j:
                different.append((view_overlap(a, small[j]), response(a, small[j])))
    m, d = np.array(moved), np.array(different)
    print(f"{len(images)} fields from {args.fields if paths[0].parent.parent.parent == args.fields else 'samples'}; "
          f"{len(m)} moved pairs, {len(d)} pairs of different fields; response threshold {OVERLAP_MIN_RESPONSE}")
    print(f"different fields: response median {np.median(d[:, 1]):.3f}, max {d[:, 1].max():.3f}; "
          f"reported as overlapping: {(d[:, 0] > 0).sum()}")
    print("| true overlap | pairs | response min / median | reported (> 0) | largest error of the estimate |")
    print("|---|---|---|---|---|")
    for lo, hi in ((0.0, 0.2), (0.2, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.8), (0.8, 1.01)):
        sel = m[(m[:, 0] >= lo) & (m[:, 0] < hi)]
        if len(sel):
            hit = sel[sel[:, 1] > 0]
            err = f"{np.abs(hit[:, 1] - hit[:, 0]).max():.3f}" if len(hit) else "-"
            print(f"| {lo:.1f}-{min(hi, 1):.1f} | {len(sel)} | {sel[:, 2].min():.3f} / {np.median(sel[:, 2]):.3f} | "
                  f"{len(hit)} | {err} |")
    a, b = small[0], small[-1]
    t = time.perf_counter()
    for _ in range(200):
        view_overlap(a, b)
    print(f"one comparison of {a.shape[1]}x{a.shape[0]} thumbnails: {(time.perf_counter() - t) / 200 * 1000:.2f} ms")
    pa, pb = prepare_view(a), prepare_view(b)
    t = time.perf_counter()
    for _ in range(200):
        prepared_overlap(pa, pb)
    print(f"with the counted view kept high-passed (what a capture pays per counted field): "
          f"{(time.perf_counter() - t) / 200 * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
