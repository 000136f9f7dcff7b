"""Cut NIH-style training cells out of annotated microscope fields, the way the device cuts them.

    python -m train.fieldcrops --fields ../shared/data/fields/iml_vivax --out runs/iml_cells

Each field is segmented by the device's own ``segment_cells``; a detection matched (IoU >= 0.5) to
an annotated cell becomes a crop made by ``field_crops`` (tight box, black outside the cell mask):
parasite-stage boxes -> ``Parasitized/``, plain red-cell boxes -> ``Uninfected/``. Unmatched
detections are not used (partially boxed sets leave many cells unlabelled). Fields are split by
image into train/val; ``patients.csv`` names the field as the "patient", and ``val_fields/`` holds
an annotations.json of the held-out fields for ``python -m device evaluate-fields``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
from pathlib import Path

import cv2

from device.fields import FieldsError, load_annotations, match_image
from device.imageio import ImageError, read_rgb
from device.preprocess import field_crops
from device.segment import segment_cells

logger = logging.getLogger("train.fieldcrops")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.fieldcrops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", required=True, help="folder with images/ and annotations.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--val-fraction", type=float, default=0.34, help="fields held out (by image)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    src = Path(args.fields)
    try:
        records = load_annotations(src)
    except FieldsError as exc:
        print(f"python -m train.fieldcrops: {exc}", file=sys.stderr)
        return 2
    names = sorted(r["image"] for r in records)
    rng = random.Random(args.seed)
    rng.shuffle(names)
    n_val = round(len(names) * args.val_fraction)
    val = set(names[:n_val])
    out = Path(args.out)
    for cls in ("Parasitized", "Uninfected"):
        (out / cls).mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in sorted(records, key=lambda r: r["image"]):
        try:
            rgb = read_rgb(src / "images" / rec["image"])
        except ImageError as exc:
            logger.warning("skipped %s", exc)
            continue
        seg = segment_cells(rgb)
        boxes = [c.bbox for c in seg.cells]
        m = match_image(boxes, rec["objects"], rgb.shape[1], rgb.shape[0])
        split = "val" if rec["image"] in val else "train"
        stem = Path(rec["image"]).stem
        crops = field_crops(rgb, seg.cells)
        for i, crop in enumerate(crops):
            g = int(m["det_to_gt"][i])
            if g < 0:
                continue
            cls = "Parasitized" if m["gt_parasite"][g] else "Uninfected"
            name = f"{cls}/field_{stem}_cell_{i}.png"
            cv2.imwrite(str(out / name), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            rows.append({"file": name, "label": cls.lower(), "patient": f"field_{stem}", "split": split})
    with (out / "patients.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "patient", "split"])
        w.writeheader()
        w.writerows(rows)
    vdir = out / "val_fields"
    (vdir / "images").mkdir(parents=True, exist_ok=True)
    for name in sorted(val):
        link = vdir / "images" / name
        if not link.exists():
            link.symlink_to((src / "images" / name).resolve())
    (vdir / "annotations.json").write_text(json.dumps([r for r in records if r["image"] in val], indent=1))
    (out / "fields_split.json").write_text(json.dumps({"source": str(src.resolve()), "seed": args.seed,
                                                       "train": sorted(set(names) - val), "val": sorted(val)},
                                                      indent=1))
    n = {(r["split"], r["label"]): 0 for r in rows}
    for r in rows:
        n[(r["split"], r["label"])] += 1
    logger.info("wrote %d crops from %d fields: %s", len(rows), len(records), dict(sorted(n.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
