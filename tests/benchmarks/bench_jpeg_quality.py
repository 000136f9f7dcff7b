"""What JPEG compression does to parasite detection: every field of an evaluate-fields folder saved again
at one JPEG quality, then scored as `python -m device evaluate-fields` scores it.

    python tests/benchmarks/bench_jpeg_quality.py QUALITY FIELD_DIR

A measurement, not a test: it prints the evaluate-fields report. (The device refuses JPEG files below
device.imageio.MIN_JPEG_QUALITY; the re-encoded pixels here never pass through that check.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    quality, field_dir = int(sys.argv[1]), sys.argv[2]
    import device.fields as fields
    from device.cli import main as cli_main
    from device.imageio import read_rgb

    def read_recompressed(*args, **kwargs):
        rgb = read_rgb(*args, **kwargs)
        ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()

    fields.read_rgb = read_recompressed  # the scorer's reader: the same fields, compressed once more
    return cli_main(["evaluate-fields", field_dir])


if __name__ == "__main__":
    sys.exit(main())
