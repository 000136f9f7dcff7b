"""Parasite detection under other imaging conditions: every field of an evaluate-fields folder dimmed,
saved again as JPEG or lossy WebP, or cut without the background normalisation, or each cell scored as the
mean logit of its flips (what `convert --views` would build into a model, here outside the one-view model),
then scored as `python -m device evaluate-fields` scores it.

    python tests/benchmarks/bench_field_conditions.py FIELD_DIR [--gain 0.7] [--jpeg-quality 50]
        [--webp-quality 50] [--no-background-normalisation] [--views 4] [--threshold T]

A measurement, not a test: it prints the evaluate-fields report. (The device refuses JPEG files below
device.imageio.MIN_JPEG_QUALITY and lossy WebP files above MAX_WEBP_QUANTIZER; the re-encoded pixels here
never pass through those checks.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("field_dir")
    ap.add_argument("--gain", type=float, default=1.0, help="multiply every pixel (a dimmer lamp: < 1)")
    ap.add_argument("--jpeg-quality", type=int, default=None, help="save each field again at this JPEG quality")
    ap.add_argument("--webp-quality", type=int, default=None, help="save each field again at this lossy WebP quality")
    ap.add_argument("--no-background-normalisation", action="store_true",
                    help="cut the cells with background gains of 1 (as before device.preprocess.field_crops)")
    ap.add_argument("--views", type=int, choices=(1, 2, 4), default=1,
                    help="score each cell as the mean logit of 1, 2 (+ mirrored) or 4 (+ upside down, both) flips")
    ap.add_argument("--threshold", type=float, default=None, help="evaluate-fields --threshold (default: the card's)")
    ap.add_argument("--model", default=None, help="evaluate-fields --model (default: the shipped model)")
    args = ap.parse_args()
    import device.fields as fields
    import device.preprocess as preprocess
    from device.cli import main as cli_main
    from device.imageio import read_rgb

    def read_changed(*a, **kw):
        rgb = read_rgb(*a, **kw)
        if args.gain != 1.0:
            rgb = np.clip(np.round(rgb.astype(np.float32) * args.gain), 0, 255).astype(np.uint8)
        if args.jpeg_quality is not None:
            ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality])
            rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()
        if args.webp_quality is not None:
            ok, buf = cv2.imencode(".webp", rgb[..., ::-1], [cv2.IMWRITE_WEBP_QUALITY, args.webp_quality])
            rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()
        return rgb

    fields.read_rgb = read_changed  # the scorer's reader
    if args.no_background_normalisation:
        preprocess.background_gains = lambda image_rgb: np.ones(3)
    if args.views > 1:
        from convert.core import VIEW_AXES, VIEWS
        from device.classifier import CellClassifier

        one_view = CellClassifier.predict

        def mean_of_views(self, batch):
            p = [np.clip(one_view(self, np.ascontiguousarray(np.flip(batch, axis=VIEW_AXES[name]))), 1e-7, 1 - 1e-7)
                 for name in VIEWS[args.views]]
            return 1 / (1 + np.exp(-np.mean([np.log(q / (1 - q)) for q in p], axis=0)))

        CellClassifier.predict = mean_of_views
    threshold = [] if args.threshold is None else ["--threshold", str(args.threshold)]
    model = [] if args.model is None else ["--model", args.model]
    return cli_main(["evaluate-fields", args.field_dir, *threshold, *model])


if __name__ == "__main__":
    sys.exit(main())
