"""Measuring segmentation (and optionally classification) on annotated microscope fields.

A field folder holds ``images/`` and ``annotations.json``: one record per image,
``{"image", "width", "height", "objects": [{"category", "bbox": [x, y, w, h]}]}``.

- Ground-truth cells are ``red blood cell`` boxes and parasite-stage boxes (``ring``, ``trophozoite``,
  ``schizont``, ``gametocyte``): a parasite box marks an infected cell, so it is a cell box itself.
- ``leukocyte`` and ``difficult`` boxes are "ignore" regions: a detection matched to one is neither a
  true nor a false positive, and it is not counted.
- Matching is greedy by IoU (highest first, one-to-one) at ``iou`` (0.5), first against cell boxes,
  then the left-over detections against ignore boxes.
- **Partial labels** (``iml_vivax``: many cells have no box): a detection centred in no box cannot be
  judged, so precision there counts only detections centred in some box, and count errors are not
  meaningful (``n/a`` in the report, ``null`` in its JSON). Taken as partial when a folder on the path
  is named like IML (``iml_vivax``, ``runs/iml_cells/val_fields``), or set ``partial_labels``; a
  "fully" labelled set where many detections overlap no box gets a warning in the report.
- **Classification** (optional ``classify``): recall of parasite-bearing cells (parasite boxes matched
  by a detection flagged infected; a red-cell box on the same cell as a parasite box, IoU >= ``iou``, is
  the same cell and dropped) and false positives per 1,000 cells (detections matched to plain
  red-cell boxes, flagged infected; on partial sets only boxed cells are judged).
- **Border cells**: :func:`device.segment.segment_cells` drops a cell the image border cuts along more
  than 0.3 of a cell diameter (one that only grazes it is kept). With ``ignore_border_gt`` (default) a
  ground-truth box within ``BORDER_MARGIN_PX`` of the border is an ignore region, whether or not the cell
  is only grazed; both sets box such cells (6 on BBBC041, 566 of 6,827 IML cell boxes), so
  ``--count-border-cells`` gives the figures with them too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device.imageio import ImageError, read_rgb
from device.preprocess import field_crops
from device.segment import SegmentParams, segment_cells

logger = logging.getLogger(__name__)

RBC_CATEGORY = "red blood cell"
PARASITE_CATEGORIES = frozenset({"ring", "trophozoite", "schizont", "gametocyte"})
IGNORE_CATEGORIES = frozenset({"leukocyte", "difficult"})
# IML-Malaria boxes only some red cells. Any folder on the path named like it (iml_vivax, runs/iml_cells/
# val_fields from train.fieldcrops, ...) is taken as partially labelled unless told otherwise.
PARTIAL_LABEL_PATTERN = re.compile(r"(^|[^a-z])iml([^a-z]|$)")
# A fully labelled set where more detections than this lie in no box at all is flagged in the report.
SUSPECT_UNJUDGED_FRAC = 0.2
# A red-cell box and a parasite box overlapping this much are one cell boxed twice (fixed: the ground truth
# must not change with the IoU a detection needs to match).
SAME_CELL_IOU = 0.5
# A box whose edge is this close to the image edge belongs to a cell cut by the border.
BORDER_MARGIN_PX = 2

Classifier = Callable[[list[np.ndarray]], np.ndarray]


class FieldsError(ValueError):
    """A field folder that cannot be evaluated at all (no or unreadable annotations, no images folder)."""


def load_annotations(root: Path) -> list:
    """The records of ``root/annotations.json``; :class:`FieldsError` with the reason when unusable."""
    path = root / "annotations.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FieldsError(f"{root}: no annotations.json (see the schema in the data README)") from exc
    except OSError as exc:
        raise FieldsError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise FieldsError(f"{path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise FieldsError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(records, list):
        raise FieldsError(f"{path}: expected a list of image records, got {type(records).__name__}")
    if not (root / "images").is_dir():
        raise FieldsError(f"{root}: no images/ folder")
    return records


def _check_record(rec: Any, index: int) -> tuple[str, str | None]:
    """The image name of annotation record ``index`` (or ``record N``) and why it cannot be scored (None
    when it can)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
        return f"record {index}", "record is not an object with an \"image\" name"
    name = rec["image"]
    if "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        return repr(name)[1:-1], "\"image\" is not the name of a file inside images/"
    objects = rec.get("objects", [])
    if not isinstance(objects, list):
        return name, "\"objects\" is not a list"
    for k, obj in enumerate(objects):
        box = obj.get("bbox") if isinstance(obj, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box)):
            return name, f"object {k} has no \"bbox\" of 4 finite numbers"
        if not isinstance(obj.get("category"), str):
            return name, f"object {k} has no \"category\" name"
    return name, None


def _finite_number(v: Any) -> bool:
    """A JSON number a box can hold: not NaN or infinite (Python's json reads those, and 1e999 as infinity)
    and not an integer too large for a float."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a`` (n x 4) and ``b`` (m x 4), both ``x, y, w, h``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    union = (a[:, 2:3] * a[:, 3:4]) + (b[:, 2] * b[:, 3]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def greedy_match(iou_matrix: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one matches ``(row, col)`` by descending IoU, keeping pairs with IoU >= ``min_iou``."""
    if iou_matrix.size == 0:
        return []
    rows, cols = np.nonzero(iou_matrix >= min_iou)
    order = np.argsort(-iou_matrix[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    out = []
    for i in order:
        r, c = int(rows[i]), int(cols[i])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        out.append((r, c))
    return out


def is_partially_labelled(field_dir: str | Path) -> bool:
    """Whether a field folder is known to box only some cells (IML-Malaria and sets cut from it)."""
    return any(PARTIAL_LABEL_PATTERN.search(part.lower()) for part in Path(field_dir).resolve().parts)


def _touches_border(box: Sequence[float], width: int, height: int) -> bool:
    x, y, w, h = box
    m = BORDER_MARGIN_PX
    return x <= m or y <= m or x + w >= width - m or y + h >= height - m


def match_image(
    det_boxes: np.ndarray,
    objects: list[dict[str, Any]],
    width: int,
    height: int,
    iou: float = 0.5,
    ignore_border_gt: bool = True,
) -> dict[str, Any]:
    """Match one image's detections to its annotation objects.

    Returns a dict with ``gt_boxes``, ``gt_parasite`` (bool per GT cell), ``det_to_gt`` (index of the
    matched GT cell or -1 per detection), ``det_ignored`` (bool per detection: matched an ignore box),
    ``det_judged`` (bool: its centre lies in some box), ``n_unknown_categories``, and ``iou`` (detections x
    GT cells).
    """
    gt, parasite, ignore = [], [], []
    unknown = 0
    for obj in objects:
        cat = obj.get("category")
        box = [float(v) for v in obj["bbox"]]
        if cat in IGNORE_CATEGORIES or (
            ignore_border_gt and (cat == RBC_CATEGORY or cat in PARASITE_CATEGORIES)
            and _touches_border(box, width, height)
        ):
            ignore.append(box)
        elif cat == RBC_CATEGORY or cat in PARASITE_CATEGORIES:
            gt.append(box)
            parasite.append(cat in PARASITE_CATEGORIES)
        else:
            unknown += 1
    gt_arr = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    par_arr = np.asarray(parasite, dtype=bool)
    if par_arr.any() and (~par_arr).any():
        # One cell boxed twice, as a red cell and as a parasite (3 in IML): one infected cell. Otherwise the
        # detection matches the red-cell box and a found parasite scores as missed plus a false positive.
        same = box_iou(gt_arr[~par_arr], gt_arr[par_arr]).max(axis=1) >= SAME_CELL_IOU
        keep = par_arr.copy()
        keep[np.flatnonzero(~par_arr)[~same]] = True
        gt_arr, par_arr = gt_arr[keep], par_arr[keep]
    det = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    ig_arr = np.asarray(ignore, dtype=np.float64).reshape(-1, 4)
    m_gt = box_iou(det, gt_arr)
    det_to_gt = np.full(len(det), -1, dtype=np.int64)
    for r, c in greedy_match(m_gt, iou):
        det_to_gt[r] = c
    det_ignored = np.zeros(len(det), dtype=bool)
    free = np.flatnonzero(det_to_gt < 0)
    if len(free) and len(ig_arr):
        m_ig = box_iou(det[free], ig_arr)
        # Several detections may fall on one ignore region (a white cell split in pieces): all ignored.
        det_ignored[free[(m_ig >= iou).any(axis=1)]] = True
    # "About a boxed cell": the detection's centre lies in some box. An unboxed neighbour of a boxed
    # cell overlaps the (loose) box but is centred outside it; half of an over-split cell is inside.
    all_boxes = np.concatenate([gt_arr, ig_arr]) if len(ig_arr) else gt_arr
    cx, cy = det[:, 0:1] + det[:, 2:3] / 2, det[:, 1:2] + det[:, 3:4] / 2
    inside = (
        (cx >= all_boxes[:, 0]) & (cx <= all_boxes[:, 0] + all_boxes[:, 2])
        & (cy >= all_boxes[:, 1]) & (cy <= all_boxes[:, 1] + all_boxes[:, 3])
    )
    det_judged = inside.any(axis=1) if inside.size else np.zeros(len(det), dtype=bool)
    return {
        "gt_boxes": gt_arr,
        "gt_parasite": par_arr,
        "det_to_gt": det_to_gt,
        "det_ignored": det_ignored,
        "det_judged": det_judged,
        "n_unknown_categories": unknown,
        "iou": m_gt,
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _f1(p: float, r: float) -> float:
    """F1 = 2TP / (2TP + FP + FN): none when nothing was boxed and nothing detected; 0 when only one side
    is empty (its precision or recall is undefined, and there is no true positive)."""
    if np.isnan(p) and np.isnan(r):
        return float("nan")
    if np.isnan(p) or np.isnan(r):
        return 0.0
    return float(2 * p * r / (p + r)) if p + r > 0 else 0.0


def evaluate_fields(
    field_dir: str | Path,
    classify: Classifier | None = None,
    threshold: float = 0.5,
    iou: float = 0.5,
    progress: Callable[[int, int, str], None] | None = None,
    *,
    params: SegmentParams | None = None,
    partial_labels: bool | None = None,
    ignore_border_gt: bool = True,
    trained_on: Collection[str] = (),
    review_floor: float | None = None,
) -> dict[str, Any]:
    """Segment (and optionally classify) every annotated field in ``field_dir`` and score it.

    Args:
        field_dir: folder with ``images/`` and ``annotations.json``.
        classify: optional ``crops -> p_infected`` (crops made by :func:`device.preprocess.field_crops`).
        threshold: p_infected at or above which a cell is flagged infected.
        iou: minimum IoU for a detection to match a ground-truth box.
        progress: optional ``callback(done, total, image_name)``.
        params: segmentation parameters (defaults when None).
        partial_labels: whether not every cell is boxed; None decides by the folder name.
        ignore_border_gt: treat ground-truth cells touching the image border as ignore regions.
        trained_on: names of images the classifier was trained on (its model card lists them). They are
            still segmented and scored for detection, but their classification is summed apart
            (``classification_training_fields``): a model scored on its own training cells says nothing.
        review_floor: the device's review floor (cells scored from it up to ``threshold`` are shown to a
            person "near the threshold"): the classification then also gives ``review``, how many counted
            cells that shows per 1,000 and the parasite recall once a person confirms those cells.

    Returns:
        A dict: ``dataset``, ``partial_labels``, ``iou``, ``threshold``, ``images`` (one row per image),
        ``errors`` (``{"image", "error"}`` per unreadable file), ``totals`` (summed counts, precision,
        recall, F1, count error), ``detection_errors`` (each red-cell box no detection matched, kind
        "cell missed", and each judged detection that matched no box, "extra cell", with the box of the
        other side that overlaps it most and their ``iou``), ``timing_ms`` (mean per stage), and
        ``classification`` when ``classify`` is given (held-out images only when ``trained_on`` names
        some). Its ``cell_errors``
        list each boxed parasite-bearing cell not flagged (``kind`` "missed", or "not segmented") and
        each plain boxed red cell flagged ("false positive"): ``image``, ``p_infected``, the detection's
        ``bbox`` and the annotation's ``box`` (both ``[x, y, w, h]``).
    """
    root = Path(field_dir)
    params = params or SegmentParams()
    dataset = root.resolve().name
    partial = is_partially_labelled(root) if partial_labels is None else bool(partial_labels)
    records = load_annotations(root)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    timings: list[dict[str, float]] = []
    detection_errors: list[dict[str, Any]] = []
    trained_on = frozenset(trained_on)
    cls_acc, cls_acc_trained = _new_classification_acc(), _new_classification_acc()
    for i, rec in enumerate(records):
        name, problem = _check_record(rec, i)
        if progress is not None:
            progress(i, len(records), name)
        if problem:
            logger.warning("skipping %s: %s", name, problem)
            errors.append({"image": name, "error": f"annotations.json: {problem}"})
            continue
        try:
            image = read_rgb(root / "images" / name)
        except ImageError as exc:
            logger.warning("skipping %s: %s", name, exc)
            errors.append({"image": name, "error": str(exc)})
            continue
        h, w = image.shape[:2]
        if (rec.get("width"), rec.get("height")) != (w, h):
            logger.warning("%s: annotation says %sx%s, image is %dx%d", name, rec.get("width"),
                           rec.get("height"), w, h)
        t0 = time.perf_counter()
        seg = segment_cells(image, params)
        timings.append(seg.timing_ms)
        det = np.asarray([c.bbox for c in seg.cells], dtype=np.float64).reshape(-1, 4)
        m = match_image(det, rec.get("objects", []), w, h, iou=iou, ignore_border_gt=ignore_border_gt)
        counted = ~m["det_ignored"]
        tp = int((m["det_to_gt"] >= 0).sum())
        judged = counted & (m["det_judged"] if partial else np.ones(len(det), dtype=bool))
        fp = int((judged & (m["det_to_gt"] < 0)).sum())
        n_gt = len(m["gt_boxes"])
        n_det = int(counted.sum())
        row = {
            "image": name,
            "n_gt": n_gt,
            "n_detected": n_det,
            "n_judged": int(judged.sum()),
            "n_in_a_box": int((counted & m["det_judged"]).sum()),
            "tp": tp,
            "fp": fp,
            "fn": n_gt - tp,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, n_gt),
            "count_error": n_det - n_gt,
            "count_error_pct": 100.0 * _ratio(n_det - n_gt, n_gt),
            "cell_diameter_px": seg.cell_diameter_px,
            "segment_ms": seg.timing_ms.get("total", (time.perf_counter() - t0) * 1000.0),
        }
        row["f1"] = _f1(row["precision"], row["recall"])
        detection_errors += _detection_errors(name, det, m, judged)
        if classify is not None:
            row["model_trained_on"] = name in trained_on
            _classify_image(name, image, seg.cells, m, counted, judged, classify, threshold, row,
                            cls_acc_trained if row["model_trained_on"] else cls_acc)
        rows.append(row)
    if progress is not None:
        progress(len(records), len(records), "")
    report: dict[str, Any] = {
        "dataset": dataset,
        "field_dir": str(root),
        "partial_labels": partial,
        "ignore_border_gt": ignore_border_gt,
        "iou": iou,
        "threshold": threshold if classify is not None else None,
        "images": rows,
        "errors": errors,
        "totals": _totals(rows),
        "detection_errors": detection_errors,
        "timing_ms": _mean_timing(timings),
    }
    if partial:  # unboxed cells make detections minus boxes meaningless: no figure to quote by mistake
        for r in [*rows, report["totals"]]:
            r.update(count_error=None, count_error_pct=None)
        report["totals"]["mean_abs_count_error_pct"] = None
    if classify is not None:
        report["classification"] = _classification_summary(cls_acc, partial, threshold, review_floor)
        report["classification"]["n_images"] = sum(not r["model_trained_on"] for r in rows)
        n_trained = sum(r["model_trained_on"] for r in rows)
        if n_trained:
            report["classification_training_fields"] = _classification_summary(cls_acc_trained, partial, threshold,
                                                                               review_floor)
            report["classification_training_fields"]["n_images"] = n_trained
    return report


def _detection_errors(name: str, det: np.ndarray, m: dict[str, Any], judged: np.ndarray) -> list[dict[str, Any]]:
    """The red-cell detection errors of one image, in the form of the classification's ``cell_errors``, each
    with the box of the other side that overlaps it most (``iou``; None when nothing overlaps it): a cell
    missed beside the detection that swallowed or cut it, an extra cell beside the cell it was cut from."""
    gt, iou = m["gt_boxes"], m["iou"]
    out = []
    for g in np.setdiff1d(np.arange(len(gt)), m["det_to_gt"]):
        j = int(np.argmax(iou[:, g])) if len(det) and iou[:, g].max() > 0 else None
        out.append(_error_entry(name, "cell missed", gt[g], None if j is None else det[j],
                                iou=None if j is None else float(iou[j, g])))
    for j in np.flatnonzero(judged & (m["det_to_gt"] < 0)):
        g = int(np.argmax(iou[j])) if len(gt) and iou[j].max() > 0 else None
        out.append(_error_entry(name, "extra cell", None if g is None else gt[g], det[j],
                                iou=None if g is None else float(iou[j, g])))
    return out


def _error_entry(name: str, kind: str, box: Any, bbox: Any, p: float | None = None,
                 iou: float | None = None) -> dict[str, Any]:
    """One listed error: the annotation's ``box`` and the detection's ``bbox`` (either may be None)."""
    out = {"image": name, "kind": kind, "p_infected": p,
           "bbox": None if bbox is None else [int(v) for v in bbox],
           "box": None if box is None else [round(float(v), 1) for v in box]}
    if kind in ("cell missed", "extra cell"):
        out["iou"] = iou
    return out


def _new_classification_acc() -> dict[str, Any]:
    return {"n_parasite_gt": 0, "n_parasite_detected": 0, "n_parasite_flagged": 0,
            "n_rbc_matched": 0, "n_rbc_flagged": 0, "n_unmatched_judged": 0, "n_unmatched_flagged": 0,
            "n_cells_classified": 0, "n_cells_flagged": 0, "p_parasite": [], "p_rbc": [], "p_counted": [],
            "cell_errors": []}


def _classify_image(
    name: str,
    image: np.ndarray,
    cells: list,
    m: dict[str, Any],
    counted: np.ndarray,
    judged: np.ndarray,
    classify: Classifier,
    threshold: float,
    row: dict[str, Any],
    acc: dict[str, Any],
) -> None:
    crops = field_crops(image, cells)
    p = np.asarray(classify(crops), dtype=np.float64).reshape(-1) if crops else np.zeros(0)
    if p.shape[0] != len(cells):
        raise ValueError(f"classify returned {p.shape[0]} scores for {len(cells)} crops")
    flagged = p >= threshold
    gt_par = m["gt_parasite"]
    d2g = m["det_to_gt"]
    matched = d2g >= 0
    par_det = matched & gt_par[np.where(matched, d2g, 0)] if len(gt_par) else np.zeros(len(d2g), dtype=bool)
    rbc_det = matched & ~par_det
    unmatched_judged = judged & ~matched
    n_par_gt = int(gt_par.sum())
    row.update({
        "n_parasite_gt": n_par_gt,
        "n_parasite_detected": int(par_det.sum()),
        "n_parasite_flagged": int((par_det & flagged).sum()),
        "n_rbc_matched": int(rbc_det.sum()),
        "n_rbc_flagged": int((rbc_det & flagged).sum()),
        "n_flagged": int((counted & flagged).sum()),
    })
    acc["n_parasite_gt"] += n_par_gt
    acc["n_parasite_detected"] += row["n_parasite_detected"]
    acc["n_parasite_flagged"] += row["n_parasite_flagged"]
    acc["n_rbc_matched"] += row["n_rbc_matched"]
    acc["n_rbc_flagged"] += row["n_rbc_flagged"]
    acc["n_unmatched_judged"] += int(unmatched_judged.sum())
    acc["n_unmatched_flagged"] += int((unmatched_judged & flagged).sum())
    acc["n_cells_classified"] += int(counted.sum())
    acc["n_cells_flagged"] += row["n_flagged"]
    acc["p_parasite"].extend(p[par_det].tolist())
    acc["p_rbc"].extend(p[rbc_det].tolist())
    acc["p_counted"].extend(p[counted].tolist())
    # Each error, to be looked at (device evaluate-fields --errors DIR): a boxed parasite-bearing cell not
    # flagged (segmented or not) and a plain boxed red cell flagged.
    for j in np.flatnonzero((par_det & ~flagged) | (rbc_det & flagged)):
        acc["cell_errors"].append(_error_entry(name, "missed" if par_det[j] else "false positive",
                                               m["gt_boxes"][d2g[j]], cells[j].bbox, float(p[j])))
    for g in np.setdiff1d(np.flatnonzero(gt_par), d2g[par_det]):
        acc["cell_errors"].append(_error_entry(name, "not segmented", m["gt_boxes"][g], None))


def error_view(image_rgb: np.ndarray, error: dict[str, Any], side_px: int = 192) -> np.ndarray:
    """One ``cell_errors`` or ``detection_errors`` entry drawn for a person to judge: the cell and its
    neighbours (RGB, ``side_px`` square), the annotation's box in green and the detection's box in red (a
    false positive, an extra cell) or orange (not flagged), with the score or the kind in the corner."""
    import cv2

    boxes = [b for b in (error["box"], error["bbox"]) if b is not None]
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    half = max(0.8 * max(x1 - x0, y1 - y0), 8.0)  # the cell and a ring of its neighbours
    h, w = image_rgb.shape[:2]
    # kept inside the image even for a box outside it or of no size (an annotation is not checked for that)
    cx, cy = min(max((x0 + x1) / 2, 0), w - 1), min(max((y0 + y1) / 2, 0), h - 1)
    left, top = int(max(0, cx - half)), int(max(0, cy - half))
    right, bottom = max(left + 1, int(min(w, cx + half))), max(top + 1, int(min(h, cy + half)))
    view = np.ascontiguousarray(image_rgb[top:bottom, left:right])
    scale = side_px / max(view.shape[:2])
    view = cv2.resize(view, (max(1, round(view.shape[1] * scale)), max(1, round(view.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)

    def rect(b, colour):
        p0 = (round((b[0] - left) * scale), round((b[1] - top) * scale))
        p1 = (round((b[0] + b[2] - left) * scale), round((b[1] + b[3] - top) * scale))
        cv2.rectangle(view, p0, p1, colour, 2)

    if error["box"] is not None:
        rect(error["box"], (0, 200, 0))
    if error["bbox"] is not None:
        rect(error["bbox"], (230, 0, 0) if error["kind"] in ("false positive", "extra cell") else (255, 150, 0))
    if error["p_infected"] is not None:
        label = f"p {error['p_infected']:.3f}"
    elif error.get("iou") is not None:
        label = f"{error['kind']}, IoU {error['iou']:.2f}"
    else:
        label = error["kind"]
    cv2.putText(view, label, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3)
    cv2.putText(view, label, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    return view


# Thresholds of the field operating curve (the card's own threshold is added).
CURVE_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.98, 0.99, 0.995)


def _classification_summary(acc: dict[str, Any], partial: bool, threshold: float,
                            review_floor: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in acc.items() if not k.startswith("p_")}
    out["parasite_recall"] = _ratio(acc["n_parasite_flagged"], acc["n_parasite_gt"])
    out["parasite_segmented_frac"] = _ratio(acc["n_parasite_detected"], acc["n_parasite_gt"])
    out["fp_per_1000_rbc"] = 1000.0 * _ratio(acc["n_rbc_flagged"], acc["n_rbc_matched"])
    out["fp_basis"] = (
        "detections matched to boxed plain red cells (partial labels: unboxed cells are not judged)"
        if partial
        else "detections matched to plain red-cell boxes"
    )
    # The same two figures at other thresholds: how far the operating point is from the field target.
    p_par, p_rbc = np.asarray(acc["p_parasite"]), np.asarray(acc["p_rbc"])
    out["operating_curve"] = [
        {"threshold": t,
         "parasite_recall": _ratio(int((p_par >= t).sum()), acc["n_parasite_gt"]),
         "fp_per_1000_rbc": 1000.0 * _ratio(int((p_rbc >= t).sum()), len(p_rbc))}
        for t in sorted({*CURVE_THRESHOLDS, float(threshold)})
    ]
    if review_floor is not None and review_floor < threshold:
        # What the review page adds: the counted cells scored from the floor up to the threshold are shown
        # to a person; the parasite cells among them are found once that person confirms them.
        p_all = np.asarray(acc["p_counted"])
        n_near = int(((p_all >= review_floor) & (p_all < threshold)).sum())
        found = int((p_par >= review_floor).sum())
        out["review"] = {
            "floor": float(review_floor),
            "n_near": n_near,
            "near_per_1000": 1000.0 * _ratio(n_near, len(p_all)),
            "n_parasite_flagged_or_near": found,
            "parasite_recall_with_review": _ratio(found, acc["n_parasite_gt"]),
        }
    return out


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tp = sum(r["tp"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    n_gt = sum(r["n_gt"] for r in rows)
    n_det = sum(r["n_detected"] for r in rows)
    p, r = _ratio(tp, tp + fp), _ratio(tp, n_gt)
    abs_err = [abs(row["count_error_pct"]) for row in rows if row["n_gt"]]
    return {
        "n_images": len(rows),
        "n_gt": n_gt,
        "n_detected": n_det,
        "n_judged": sum(row["n_judged"] for row in rows),
        "n_in_a_box": sum(row["n_in_a_box"] for row in rows),
        "tp": tp,
        "fp": fp,
        "fn": n_gt - tp,
        "precision": p,
        "recall": r,
        "f1": _f1(p, r),
        "count_error": n_det - n_gt,
        "count_error_pct": 100.0 * _ratio(n_det - n_gt, n_gt),
        "mean_abs_count_error_pct": float(np.mean(abs_err)) if abs_err else float("nan"),
    }


def _mean_timing(timings: list[dict[str, float]]) -> dict[str, float]:
    if not timings:
        return {}
    keys = list(timings[0])
    return {k: float(np.mean([t.get(k, 0.0) for t in timings])) for k in keys}


def _fmt(v: Any, spec: str) -> str:
    if isinstance(v, float) and np.isnan(v):
        return "n/a"
    return format(v, spec)


def format_report(report: dict[str, Any]) -> str:
    """Plain-text tables of an :func:`evaluate_fields` report."""
    partial = report["partial_labels"]
    lines = [
        f"Fields: {report['dataset']} ({report['field_dir']})",
        f"Red-cell detection at IoU >= {report['iou']:.2f}; ground truth = red-cell + parasite boxes; "
        "leukocyte/difficult boxes ignored"
        + ("; boxes touching the border ignored (cut cells are dropped by design; --count-border-cells counts them)"
           if report["ignore_border_gt"]
           else ""),
    ]
    if partial:
        lines.append(
            "PARTIAL LABELS: not every cell is boxed. Precision counts only detections centred in some box "
            "('judged' below); count errors would compare with boxed cells only: n/a."
        )
    head = f"{'image':<42} {'GT':>5} {'det':>5} {'judged':>6} {'TP':>5} {'FP':>4} {'FN':>4} " \
           f"{'P':>6} {'R':>6} {'F1':>6} {'count err':>9} {'err %':>7} {'ms':>6}"
    lines += ["", head, "-" * len(head)]

    def row_line(name: str, r: dict[str, Any], ms: float | None) -> str:
        err = "n/a" if partial else f"{r['count_error']:+d}"
        err_pct = "n/a" if partial else _fmt(r["count_error_pct"], "+.1f")
        return (
            f"{name[:42]:<42} {r['n_gt']:>5} {r['n_detected']:>5} {r['n_judged']:>6} {r['tp']:>5} "
            f"{r['fp']:>4} {r['fn']:>4} {_fmt(r['precision'], '.3f'):>6} {_fmt(r['recall'], '.3f'):>6} "
            f"{_fmt(r['f1'], '.3f'):>6} {err:>9} {err_pct:>7} {'' if ms is None else f'{ms:.0f}':>6}"
        )

    for r in report["images"]:
        lines.append(row_line(r["image"], r, r["segment_ms"]))
    lines.append("-" * len(head))
    t = report["totals"]
    lines.append(row_line(f"TOTAL ({t['n_images']} images)", t, None))
    if not partial:
        lines.append(f"mean |count error| per image: {_fmt(t['mean_abs_count_error_pct'], '.1f')}%")
        far = 1.0 - _ratio(t["n_in_a_box"], t["n_detected"])
        if far > SUSPECT_UNJUDGED_FRAC:
            lines.append(
                f"WARNING: {far:.0%} of detections lie in no box at all: if this set boxes only some "
                "cells, evaluate it with partial_labels=True (precision is meaningless otherwise)."
            )
    if report["timing_ms"]:
        tm = report["timing_ms"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in tm.items() if k != "total")
        lines.append(f"segmentation ms per image (mean, this machine): total {tm.get('total', 0):.1f} ({stages})")
    c = report.get("classification")
    if c:
        lines.append("")
        lines += _classification_lines(report, c)
    ct = report.get("classification_training_fields")
    if ct:
        lines += [
            "",
            f"The model was trained on cells of {ct['n_images']} of these images (its model card lists them): "
            f"the figures above are the other {c['n_images']}. On its own training images, not a measurement:",
            f"  parasite recall {_fmt(ct['parasite_recall'], '.3f')} ({ct['n_parasite_flagged']} of "
            f"{ct['n_parasite_gt']}), {_fmt(ct['fp_per_1000_rbc'], '.1f')} false positives per 1,000 cells",
        ]
    if report["errors"]:
        lines += ["", f"Unreadable images ({len(report['errors'])}), skipped:"]
        lines += [f"  {e['image']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines)


def _classification_lines(report: dict[str, Any], c: dict[str, Any]) -> list[str]:
    return [
        f"Classification at p_infected >= {report['threshold']:.3f} ({c['n_images']} images):",
        f"  parasite-bearing cells: {c['n_parasite_gt']} boxed, {c['n_parasite_detected']} segmented "
        f"({_fmt(c['parasite_segmented_frac'], '.3f')}), {c['n_parasite_flagged']} flagged -> "
        f"recall {_fmt(c['parasite_recall'], '.3f')}",
        f"  false positives: {c['n_rbc_flagged']} of {c['n_rbc_matched']} -> "
        f"{_fmt(c['fp_per_1000_rbc'], '.1f')} per 1,000 cells ({c['fp_basis']})",
        f"  unmatched judged detections flagged: {c['n_unmatched_flagged']} of {c['n_unmatched_judged']}; "
        f"all counted cells flagged: {c['n_cells_flagged']} of {c['n_cells_classified']}",
        "  threshold     " + "".join(f"{r['threshold']:>8.4g}" for r in c["operating_curve"]),
        "  recall        " + "".join(f"{_fmt(r['parasite_recall'], '.3f'):>8}" for r in c["operating_curve"]),
        "  FP per 1,000  " + "".join(f"{_fmt(r['fp_per_1000_rbc'], '.1f'):>8}" for r in c["operating_curve"]),
        *([] if not c.get("review") else [
            f"  with the cells near the threshold reviewed (p from {c['review']['floor']:g}, shown to a person): "
            f"{c['review']['n_near']} shown of {c['n_cells_classified']} counted "
            f"({_fmt(c['review']['near_per_1000'], '.1f')} per 1,000); parasite-bearing cells flagged or shown "
            f"{c['review']['n_parasite_flagged_or_near']} of {c['n_parasite_gt']} -> recall "
            f"{_fmt(c['review']['parasite_recall_with_review'], '.3f')} once a person confirms them"]),
    ]
