"""How fast the records grow: database bytes per field and per cell, with the bundled sample fields.

    python tests/benchmarks/bench_db_growth.py [--slides 30] [--fields 20]

Analyses the sample fields with the shipped model, then stores them (cells, boxes, verdicts and the
camera view of each field) in a fresh database, ``--slides`` slides of ``--fields`` fields each, each
slide finished as a technician would. The images live beside the database and are not counted here
(systemd/README.md, Free space). A measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.analysis import analyze_field  # noqa: E402
from device.camera import encode_view, thumbnail  # noqa: E402
from device.classifier import CellClassifier  # noqa: E402
from device.imageio import read_rgb  # noqa: E402
from device.store import DB_NAME, FieldImages, ModelInfo, Store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=30)
    ap.add_argument("--fields", type=int, default=20, help="fields per slide")
    ap.add_argument("--model", default=str(ROOT / "models" / "cellnet_int8.tflite"))
    args = ap.parse_args()
    clf = CellClassifier(args.model)
    fields = []
    for path in sorted((ROOT / "device" / "samples").glob("*.jpg")):
        rgb = read_rgb(path)
        fields.append((analyze_field(rgb, clf), encode_view(thumbnail(rgb))))
    model = ModelInfo(clf.card.data["name"], clf.card.sha256, clf.threshold, 0.004)
    images = FieldImages(b"\xff\xd8\xff\xe0", None, {})  # image files are not in the database
    n_fields = n_cells = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        for k in range(args.slides):
            sid = store.create_slide(sample_id=f"GROWTH-{k}", model=model, target_rbc=2000, rbc_per_ul=5e6)
            for j in range(args.fields):
                result, view = fields[(k + j) % len(fields)]
                store.add_field(sid, result, source="camera", model_sha256=model.sha256, images=images,
                                view_png=view)
                n_fields += 1
                n_cells += result.rbc_count
            store.finish_slide(sid, lambda slide, totals: {})
        store.close()
        size = (Path(tmp) / DB_NAME).stat().st_size
    print(f"{n_fields} fields ({n_cells} cells) in {args.slides} finished slides: database {size / 1e6:.2f} MB, "
          f"{size / n_fields:,.0f} B per field, {size / n_cells:.0f} B per cell; camera view of a field "
          f"{sum(len(v) for _, v in fields) / len(fields) / 1e3:.1f} kB while its slide is open")
    return 0


if __name__ == "__main__":
    sys.exit(main())
