"""'Already counted' on dense and on thin fields: the same window after small changes, and different fields.

    python tests/benchmarks/bench_same_view.py [--fields ../shared/data/fields] [--cells 10 20]

For each field of the evaluate-fields folders (images/), a 900x1200 window is compared (as
`device.camera.same_view` compares the thumbnails) with the same window after a lamp change (+10%, -5%), a
drift of 1-4 px, a refocus with a 3 px drift and a JPEG round trip at quality 75, and with the windows of every
other field. Thin fields are made from the real ones: K of each field's segmented cells kept on its plasma
colour (with sensor noise), the rest of the field plasma. Prints how many same-window changes were taken for
the same view (should be all) and how many pairs of different fields (should be none), and the ratio of the
difference to the views' contrast (`SAME_VIEW_MAX_DIFF_OF_CONTRAST` is the limit). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


TURNS = (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 3), lambda a: a[:, ::-1],
         lambda a: a[::-1], lambda a: a.transpose(1, 0, 2), lambda a: np.rot90(a, 1)[:, ::-1])


def main() -> int:
    import device.camera as cam
    from device.imageio import IMAGE_SUFFIXES, read_rgb
    from device.segment import segment_cells

    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", default=str(ROOT.parent / "shared" / "data" / "fields"))
    ap.add_argument("--cells", type=int, nargs="+", default=[10, 20], help="cells kept per thin field")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    files = sorted(p for p in Path(args.fields).glob("*/images/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    fields = []
    for f in files:
        rgb = read_rgb(f)
        if rgb.shape[1] < 1310 or rgb.shape[0] < 1010:
            rgb = cv2.resize(rgb, (1600, 1200), interpolation=cv2.INTER_LINEAR)
        fields.append((rgb, segment_cells(rgb)))

    def thin(rgb, seg, k):
        bright = rgb.reshape(-1, 3)[rgb.reshape(-1, 3).sum(1) > np.percentile(rgb.sum(2), 80)]
        out = np.clip(np.full(rgb.shape, np.median(bright, axis=0)) + rng.normal(0, 2, rgb.shape), 0, 255)
        out = out.astype(np.uint8)
        for i in rng.choice(len(seg.cells), size=min(k, len(seg.cells)), replace=False):
            c = seg.cells[i]
            x, y, w, h = c.bbox
            out[y : y + h, x : x + w][c.mask] = rgb[y : y + h, x : x + w][c.mask]
        return out

    def changed(img):
        f = img.astype(np.float32)
        yield np.clip(f[100:1000, 100:1300] * 1.10, 0, 255)
        yield f[100:1000, 100:1300] * 0.95
        for px in (1, 2, 3, 4):
            yield img[100:1000, 100 + px : 1300 + px]
        yield cv2.GaussianBlur(img[100:1000, 103:1303], (0, 0), 1.0)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[100:1000, 100:1300]), [cv2.IMWRITE_JPEG_QUALITY, 75])
        yield cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)

    def view(img):
        return cam.thumbnail(np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)))

    print(f"{len(files)} fields from {args.fields}; limits: {cam.SAME_VIEW_MAX_DIFF} gray levels and "
          f"{cam.SAME_VIEW_MAX_DIFF_OF_CONTRAST} of the contrast")
    for k in [None, *args.cells]:
        imgs = [rgb if k is None else thin(rgb, seg, k) for rgb, seg in fields]
        views = [view(img[100:1000, 100:1300]) for img in imgs]
        same = [cam.same_view(v, view(c)) for v, img in zip(views, imgs, strict=True) for c in changed(img)]
        pairs = list(itertools.combinations(range(len(views)), 2))
        wrong = sum(cam.same_view(views[i], views[j]) for i, j in pairs)
        # an upload is also compared turned and mirrored (CountedViews.reserve with camera.turned_views): each
        # window's 7 turns are found, and no other field's turn is taken for it
        windows = [np.ascontiguousarray(np.clip(img[100:1000, 100:1300], 0, 255).astype(np.uint8)) for img in imgs]
        looks = [cam.turned_views(win) for win in windows]
        turned = sum(any(cam.same_view(views[i], look) for look in looks[j])
                     for i, j in itertools.permutations(range(len(views)), 2))
        found = sum(any(cam.same_view(v, look) for look in cam.turned_views(np.ascontiguousarray(t(win))))
                    for v, win in zip(views, windows, strict=True) for t in TURNS)
        name = "dense (as captured)" if k is None else f"thin, {k} cells each"
        print(f"{name:22s} same window after a change: {sum(same)} of {len(same)} taken as the same view; "
              f"different fields: {wrong} of {len(pairs)} pairs taken as the same; turned or mirrored: {found} of "
              f"{len(views) * len(TURNS)} found, other fields in any turn taken for one: {turned} of "
              f"{len(views) * (len(views) - 1)} ordered pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
