"""The quality gate's "nothing in view" measure on real fields and on blank ones.

    python tests/benchmarks/measure_blank_gate.py [--fields ../shared/data/fields]

Prints ``device.analysis.local_contrast`` (the detail against the smooth light, scaled to a field lit to 240)
for: the bundled sample fields and, when ``--fields`` holds them, the IML and BBBC041 fields; the same under
a lamp at 42%; blurred at sigma 16 px (far past "out of focus"), at full and at 42% light; synthetic blank
fields (bare glass, plasma pink or blue; 0 or 40% vignetting; lamp at 35, 60 and 100%; sensor noise of sd
0-20; through JPEG quality 70); and bare glass with 3, 10 and 30 specks of dust. The gate rejects a field
below ``MIN_LOCAL_CONTRAST``. A measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.analysis import MIN_LOCAL_CONTRAST, _small, local_contrast  # noqa: E402
from device.imageio import IMAGE_SUFFIXES, read_rgb  # noqa: E402


def _detail(rgb: np.ndarray) -> float:
    value = local_contrast(cv2.cvtColor(_small(rgb), cv2.COLOR_RGB2GRAY))
    return float("nan") if value is None else value


def _blank(rng, colour, vignetting: float, noise_sd: float, light: float, dust: int = 0) -> np.ndarray:
    h, w = 960, 1280
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = (np.hypot(xx - w / 2, yy - h / 2) / (0.625 * w)) ** 2
    img = np.asarray(colour, np.float32) * light * (1 - vignetting * r2)[..., None] + rng.normal(0, noise_sd, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(dust):
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), 5, (90, 90, 90), -1)
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_COLOR)


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f} (n={len(values)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=Path, default=ROOT.parent / "shared" / "data" / "fields")
    args = ap.parse_args()
    paths = sorted((ROOT / "device" / "samples").glob("*.jpg"))
    for sub in ("iml_vivax", "bbbc041"):
        folder = args.fields / sub / "images"
        if folder.is_dir():
            paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    real = [read_rgb(p) for p in paths]
    print(f"gate: detail < {MIN_LOCAL_CONTRAST:g} is 'nothing in view'")
    print(f"real fields:                      {_span([_detail(x) for x in real])}")
    print(f"  lamp at 42%:                    {_span([_detail((x * 0.42).astype(np.uint8)) for x in real])}")
    blurred = [cv2.GaussianBlur(x, (0, 0), 16) for x in real]
    print(f"  blurred (sigma 16 px):          {_span([_detail(x) for x in blurred])}")
    print(f"  blurred, lamp at 42%:           {_span([_detail((x * 0.42).astype(np.uint8)) for x in blurred])}")
    rng = np.random.default_rng(1)
    blanks = [_detail(_blank(rng, c, v, sd, light))
              for c in ((240, 240, 240), (236, 222, 200), (190, 200, 230)) for v in (0.0, 0.4)
              for sd in (0, 5, 10, 20) for light in (1.0, 0.6, 0.35)]
    print(f"blank fields:                     {_span(blanks)}")
    dusty = [_detail(_blank(rng, (240, 240, 240), 0.2, 3, 1.0, dust)) for dust in (3, 10, 30)]
    print(f"bare glass, 3 / 10 / 30 specks:   {' / '.join(f'{d:.1f}' for d in dusty)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
