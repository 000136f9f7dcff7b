"""Red-cell segmentation and field evaluation on real BBBC041 fixtures and synthetic fields.

Floors are a few points under what the segmenter measured on these fixtures (full resolution,
1600x1200; 2026-12-01): 00d04a90 F1 0.957, count +2.4%; 0f0c949e F1 0.946, count -2.1%. A real regression
fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.fields import box_iou, evaluate_fields, format_report, greedy_match, match_image
from device.imageio import read_rgb
from device.segment import Cell, Segmentation, SegmentParams, segment_cells

FIELDS = Path(__file__).resolve().parent / "fixtures" / "fields"
RECORDS = {r["image"]: r for r in json.loads((FIELDS / "annotations.json").read_text())}

# image -> (F1 floor, max |count error| as a fraction of the ground-truth count)
FLOORS = {
    "00d04a90-80e5-4bce-9511-1b64eabb7a47.webp": (0.91, 0.06),
    "0f0c949e-018a-4f3f-ab02-3704f49c7754.png": (0.92, 0.08),
}


@pytest.fixture(scope="module")
def segmented() -> dict[str, tuple[np.ndarray, Segmentation]]:
    out = {}
    for name in FLOORS:
        image = read_rgb(FIELDS / "images" / name)
        out[name] = (image, segment_cells(image))
    return out


def _score(name: str, image: np.ndarray, seg: Segmentation) -> tuple[float, int, int]:
    h, w = image.shape[:2]
    m = match_image([c.bbox for c in seg.cells], RECORDS[name]["objects"], w, h)
    counted = ~m["det_ignored"]
    tp = int((m["det_to_gt"] >= 0).sum())
    fp = int((counted & (m["det_to_gt"] < 0)).sum())
    n_gt = len(m["gt_boxes"])
    f1 = 2 * tp / (2 * tp + fp + (n_gt - tp))
    return f1, int(counted.sum()), n_gt


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_real_field_count_and_f1_above_floor(segmented, name):
    image, seg = segmented[name]
    f1, n_det, n_gt = _score(name, image, seg)
    f1_floor, count_tol = FLOORS[name]
    assert f1 >= f1_floor, f"F1 {f1:.3f} < {f1_floor}"
    assert abs(n_det - n_gt) <= count_tol * n_gt, f"{n_det} cells found, {n_gt} boxed"


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_masks_lie_in_their_boxes_and_boxes_in_the_image(segmented, name):
    image, seg = segmented[name]
    h, w = image.shape[:2]
    assert seg.cells
    for cell in seg.cells:
        assert isinstance(cell, Cell)
        x, y, bw, bh = cell.bbox
        assert all(isinstance(v, int) for v in cell.bbox)
        assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
        assert cell.mask.dtype == bool and cell.mask.shape == (bh, bw)
        assert cell.area_px == int(cell.mask.sum()) > 0
        # the box is tight around the mask
        assert cell.mask[0].any() and cell.mask[-1].any() and cell.mask[:, 0].any() and cell.mask[:, -1].any()
    assert 0.0 < seg.foreground_frac < 1.0
    assert seg.foreground_frac == pytest.approx(sum(c.area_px for c in seg.cells) / (h * w))
    # BBBC041 cells are ~100 px across at this magnification
    assert 80 <= seg.cell_diameter_px <= 125
    assert {"scale", "resize", "foreground", "split", "filter", "map_back", "total"} <= set(seg.timing_ms)


def test_sizes_follow_the_image_scale(segmented):
    name = "0f0c949e-018a-4f3f-ab02-3704f49c7754.png"
    image, seg = segmented[name]
    half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    seg_half = segment_cells(half)
    assert seg_half.cell_diameter_px == pytest.approx(seg.cell_diameter_px / 2, rel=0.1)
    assert abs(len(seg_half.cells) - len(seg.cells)) <= 0.1 * len(seg.cells)


def test_input_is_not_modified_and_bad_input_is_refused(segmented):
    image, _ = segmented["0f0c949e-018a-4f3f-ab02-3704f49c7754.png"]
    before = image.copy()
    segment_cells(image)
    assert np.array_equal(image, before)
    with pytest.raises(ValueError):
        segment_cells(image[:, :, 0])
    with pytest.raises(ValueError):
        segment_cells(image.astype(np.float32))


# --- synthetic fields ----------------------------------------------------------------------------------

RADIUS = 30
INTERIOR = [(100, 100), (200, 110), (330, 90), (450, 120), (560, 100), (120, 250), (260, 240), (400, 260),
            (530, 250), (150, 390), (300, 380), (450, 390)]


def _field(extra_cells=(), white_cell=None, scale_bar=False, seed=0, draw=None) -> np.ndarray:
    """A 640x480 pink smear: discs with a pale centre on light plasma, blurred, with sensor noise.
    ``draw(img)``: something more drawn before the blur and noise, as the cells are."""
    img = np.full((480, 640, 3), (232, 228, 236), np.uint8)
    if draw:
        draw(img)
    for x, y in [*INTERIOR, *extra_cells]:
        cv2.circle(img, (x, y), RADIUS, (205, 120, 170), -1, lineType=cv2.LINE_AA)
        cv2.circle(img, (x, y), RADIUS // 3, (222, 175, 205), -1, lineType=cv2.LINE_AA)
    if white_cell:  # pale cytoplasm and a two-lobed dark purple nucleus about a red cell's size
        x, y = white_cell
        cv2.circle(img, (x, y), int(1.4 * RADIUS), (215, 200, 220), -1, lineType=cv2.LINE_AA)
        cv2.ellipse(img, (x - 14, y), (16, 25), 20, 0, 360, (95, 25, 115), -1, lineType=cv2.LINE_AA)
        cv2.ellipse(img, (x + 18, y + 4), (15, 24), -20, 0, 360, (95, 25, 115), -1, lineType=cv2.LINE_AA)
    if scale_bar:  # like IML's burned-in "50 um" bar, lower right
        cv2.line(img, (520, 440), (610, 440), (10, 10, 10), 3)
        cv2.putText(img, "50 um", (530, 465), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (10, 10, 10), 2)
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    noise = np.random.default_rng(seed).integers(-4, 5, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _disc_boxes(centres) -> np.ndarray:
    return np.array([(x - RADIUS, y - RADIUS, 2 * RADIUS, 2 * RADIUS) for x, y in centres], dtype=float)


def _assert_each_disc_found_once(seg: Segmentation, centres) -> None:
    """One detection per disc, with its box close to the disc's (IoU >= 0.7), and nothing else."""
    iou = box_iou(np.array([c.bbox for c in seg.cells], dtype=float).reshape(-1, 4), _disc_boxes(centres))
    assert len(seg.cells) == len(centres), f"{len(seg.cells)} cells for {len(centres)} discs"
    assert len(greedy_match(iou, 0.7)) == len(centres), f"best IoU per disc: {iou.max(axis=0).round(2)}"


def test_synthetic_field_finds_every_whole_cell_once():
    seg = segment_cells(_field())
    _assert_each_disc_found_once(seg, INTERIOR)
    assert seg.cell_diameter_px == pytest.approx(2 * RADIUS, rel=0.15)


def test_cell_cut_by_the_border_is_dropped():
    seg = segment_cells(_field(extra_cells=[(8, 320), (330, 475)]))
    _assert_each_disc_found_once(seg, INTERIOR)
    h, w = 480, 640
    for x, y, bw, bh in (c.bbox for c in seg.cells):
        assert x > 0 and y > 0 and x + bw < w and y + bh < h


def test_touching_cells_are_split():
    extra = (330 + 2 * RADIUS - 4, 90)  # overlaps the (330, 90) cell by 4 px
    seg = segment_cells(_field(extra_cells=[extra]))
    _assert_each_disc_found_once(seg, [*INTERIOR, extra])


def test_white_cell_and_scale_bar_are_not_red_cells():
    seg = segment_cells(_field(white_cell=(560, 390), scale_bar=True))
    _assert_each_disc_found_once(seg, INTERIOR)


def test_a_clump_far_larger_than_a_cell_is_not_counted_as_one():
    # a dark area 4.7 times a cell's (a thick spot, cells piled up): not one red cell
    seg = segment_cells(_field(draw=lambda img: cv2.circle(img, (570, 400), 65, (205, 120, 170), -1)))
    _assert_each_disc_found_once(seg, INTERIOR)


def test_a_long_thin_shape_is_not_a_red_cell():
    # a fibre or scratch of about a cell's area, 8 times longer than wide
    seg = segment_cells(_field(draw=lambda img: cv2.rectangle(img, (80, 440), (230, 458), (205, 120, 170), -1)))
    _assert_each_disc_found_once(seg, INTERIOR)


@pytest.mark.parametrize(
    "image",
    [
        np.full((480, 640, 3), 200, np.uint8),
        np.zeros((480, 640, 3), np.uint8),
        np.full((480, 640, 3), 255, np.uint8),
        np.clip(np.full((480, 640, 3), 210, np.int16) + np.random.default_rng(1).integers(-5, 6, (480, 640, 3)),
                0, 255).astype(np.uint8),
    ],
    ids=["grey", "black", "white", "grey-noise"],
)
def test_blank_field_gives_no_cells(image):
    seg = segment_cells(image)
    assert seg.cells == []
    assert seg.foreground_frac == 0.0


def test_diameter_hint_skips_the_scale_search(monkeypatch):
    import device.segment as segment_module

    def no_search(*args, **kwargs):
        raise AssertionError("the scale search ran although the diameter was given")

    monkeypatch.setattr(segment_module, "_estimate_diameter", no_search)
    image = _field()
    seg = segment_cells(image, SegmentParams(cell_diameter_hint_px=2.0 * RADIUS))
    assert seg.cell_diameter_px == 2.0 * RADIUS
    assert len(seg.cells) == len(INTERIOR)


# --- field evaluation ----------------------------------------------------------------------------------


def test_evaluation_of_the_fixture_folder_matches_direct_computation(segmented):
    seen: list[tuple[int, int, str]] = []
    report = evaluate_fields(FIELDS, progress=lambda i, n, name: seen.append((i, n, name)))
    assert {"dataset", "partial_labels", "iou", "images", "errors", "totals", "timing_ms"} <= set(report)
    assert report["partial_labels"] is False and report["errors"] == []
    assert [name for _, _, name in seen[:-1]] == [r["image"] for r in RECORDS.values()]
    rows = {r["image"]: r for r in report["images"]}
    assert set(rows) == set(FLOORS)
    for name, row in rows.items():
        assert {"n_gt", "n_detected", "tp", "fp", "fn", "precision", "recall", "f1", "count_error",
                "count_error_pct"} <= set(row)
        image, seg = segmented[name]
        f1, n_det, n_gt = _score(name, image, seg)
        assert (row["n_detected"], row["n_gt"]) == (n_det, n_gt)
        assert row["f1"] == pytest.approx(f1)
        assert row["count_error"] == n_det - n_gt
        assert row["count_error_pct"] == pytest.approx(100.0 * (n_det - n_gt) / n_gt)
    t = report["totals"]
    assert t["tp"] == sum(r["tp"] for r in rows.values())
    assert t["n_gt"] == sum(r["n_gt"] for r in rows.values()) == t["tp"] + t["fn"]
    assert t["precision"] == pytest.approx(t["tp"] / (t["tp"] + t["fp"]))
    assert t["recall"] == pytest.approx(t["tp"] / t["n_gt"])
    text = format_report(report)
    assert "TOTAL (2 images)" in text and "PARTIAL LABELS" not in text
    json.dumps(report)  # the CLI writes it as JSON


def test_classification_metrics_with_a_fake_classifier():
    everything = evaluate_fields(FIELDS, classify=lambda crops: np.ones(len(crops)), threshold=0.5)
    nothing = evaluate_fields(FIELDS, classify=lambda crops: np.zeros(len(crops)), threshold=0.5)
    c1, c0 = everything["classification"], nothing["classification"]
    n_parasite_boxes = sum(
        o["category"] in {"ring", "trophozoite", "schizont", "gametocyte"}
        for r in RECORDS.values() for o in r["objects"]
    )
    assert c1["n_parasite_gt"] == c0["n_parasite_gt"] == n_parasite_boxes == 5
    assert c1["parasite_recall"] == pytest.approx(c1["n_parasite_detected"] / n_parasite_boxes)
    assert c1["fp_per_1000_rbc"] == pytest.approx(1000.0)
    assert c0["parasite_recall"] == 0.0 and c0["fp_per_1000_rbc"] == 0.0
    assert "per 1,000 cells" in format_report(everything)


def test_field_operating_curve_counts_each_threshold():
    # scores spread evenly over 0..1 in every field: each threshold flags a different share
    report = evaluate_fields(FIELDS, classify=lambda crops: np.linspace(0.0, 1.0, len(crops)), threshold=0.9)
    c = report["classification"]
    curve = {row["threshold"]: row for row in c["operating_curve"]}
    assert 0.9 in curve and list(curve) == sorted(curve)
    at_card = curve[0.9]
    assert at_card["parasite_recall"] == pytest.approx(c["parasite_recall"])
    assert at_card["fp_per_1000_rbc"] == pytest.approx(c["fp_per_1000_rbc"])
    recalls = [row["parasite_recall"] for row in c["operating_curve"]]
    fps = [row["fp_per_1000_rbc"] for row in c["operating_curve"]]
    assert recalls == sorted(recalls, reverse=True) and fps == sorted(fps, reverse=True)
    assert fps[0] > fps[-1]  # linspace scores: a higher threshold flags fewer plain cells
    assert "FP per 1,000" in format_report(report)


def test_crops_given_to_the_classifier_are_nih_style():
    black_corner = []

    def classify(crops):
        for crop in crops:
            assert crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[2] == 3
            corners = (crop[0, 0], crop[0, -1], crop[-1, 0], crop[-1, -1])
            black_corner.append(any((c == 0).all() for c in corners))
        return np.full(len(crops), 0.1)

    evaluate_fields(FIELDS, classify=classify)
    # tight box around a round cell, black outside its mask: the corners are black
    assert len(black_corner) > 100 and np.mean(black_corner) > 0.9


def test_corrupt_and_missing_images_are_reported_and_the_run_goes_on(tmp_path):
    good = "0f0c949e-018a-4f3f-ab02-3704f49c7754.png"
    (tmp_path / "images").mkdir()
    shutil.copy(FIELDS / "images" / good, tmp_path / "images" / good)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    records = [
        {"image": "corrupt.png", "width": 1600, "height": 1200, "objects": []},
        {"image": "missing.jpg", "width": 1600, "height": 1200, "objects": []},
        RECORDS[good],
    ]
    (tmp_path / "annotations.json").write_text(json.dumps(records))
    report = evaluate_fields(tmp_path)
    assert [e["image"] for e in report["errors"]] == ["corrupt.png", "missing.jpg"]
    assert all(e["error"] for e in report["errors"])
    assert [r["image"] for r in report["images"]] == [good]
    assert report["totals"]["n_images"] == 1
    text = format_report(report)
    assert "corrupt.png" in text and "missing.jpg" in text


def test_partial_labels_judge_only_boxed_cells(tmp_path):
    name = "0f0c949e-018a-4f3f-ab02-3704f49c7754.png"
    (tmp_path / "images").mkdir()
    shutil.copy(FIELDS / "images" / name, tmp_path / "images" / name)
    rec = dict(RECORDS[name])
    rec["objects"] = rec["objects"][: len(rec["objects"]) // 2]  # box only half the cells
    (tmp_path / "annotations.json").write_text(json.dumps([rec]))
    full = evaluate_fields(tmp_path, partial_labels=False)["totals"]
    partial_report = evaluate_fields(tmp_path, partial_labels=True)
    partial = partial_report["totals"]
    assert partial["tp"] == full["tp"]
    assert partial["fp"] < full["fp"]  # unboxed cells are not counted as false positives
    assert partial["n_judged"] < partial["n_detected"]
    assert "PARTIAL LABELS" in format_report(partial_report)
    # detections minus boxes means nothing here: no count error in the JSON to be quoted by mistake
    assert partial["count_error_pct"] is None and partial["mean_abs_count_error_pct"] is None
    assert all(r["count_error"] is None for r in partial_report["images"])
    assert full["count_error"] is not None


def test_a_cell_boxed_as_red_cell_and_as_parasite_is_one_infected_cell():
    cell, other = [100, 100, 80, 80], [300, 100, 80, 80]
    objects = [{"category": "red blood cell", "bbox": [102, 98, 80, 82]},  # the same cell, boxed twice
               {"category": "trophozoite", "bbox": cell},
               {"category": "red blood cell", "bbox": other}]
    m = match_image([cell, other], objects, 1000, 800)
    assert len(m["gt_boxes"]) == 2 and m["gt_parasite"].tolist() == [True, False]
    # the detection on the infected cell matches its parasite box (it matched the red-cell box before)
    assert m["gt_parasite"][m["det_to_gt"][0]] and not m["gt_parasite"][m["det_to_gt"][1]]


def test_images_the_model_was_trained_on_are_scored_apart():
    trained = sorted(RECORDS)[0]

    def scores(crops):
        return np.linspace(0.0, 1.0, len(crops))

    both = evaluate_fields(FIELDS, classify=scores, threshold=0.5)
    split = evaluate_fields(FIELDS, classify=scores, threshold=0.5, trained_on={trained, "not-here.png"})
    held, seen = split["classification"], split["classification_training_fields"]
    assert (held["n_images"], seen["n_images"], both["classification"]["n_images"]) == (1, 1, 2)
    assert "classification_training_fields" not in both
    row = next(r for r in split["images"] if r["image"] == trained)
    assert row["model_trained_on"] and seen["n_parasite_gt"] == row["n_parasite_gt"] > 0
    for key in ("n_parasite_gt", "n_parasite_flagged", "n_rbc_matched", "n_rbc_flagged", "n_cells_classified"):
        assert held[key] + seen[key] == both["classification"][key]
    assert split["totals"] == both["totals"]  # segmentation is scored on every image either way
    text = format_report(split)
    assert "trained on cells of 1 of these images" in text and "(1 images)" in text


def test_operating_curve_row_of_the_card_threshold_matches_the_summary_exactly():
    # int8 outputs are discrete: a score may lie between the card's threshold and its 4-digit rounding
    threshold = 0.978875

    def scores(crops):
        return np.full(len(crops), 0.97888)

    report = evaluate_fields(FIELDS, classify=scores, threshold=threshold)
    c = report["classification"]
    row = next(r for r in c["operating_curve"] if r["threshold"] == threshold)
    assert c["parasite_recall"] > 0 and c["fp_per_1000_rbc"] > 0  # every cell is flagged at the card threshold
    assert row["parasite_recall"] == c["parasite_recall"] and row["fp_per_1000_rbc"] == c["fp_per_1000_rbc"]
    assert "  0.9789" in format_report(report)  # shown rounded, counted exactly


@pytest.mark.parametrize("size", [(4056, 3040), (4055, 3039)], ids=["even", "odd"])
def test_masks_sit_on_their_cells_across_the_whole_frame_whatever_its_size(size):
    """Halving an odd-sized frame dropped its last row and column while the scale back was taken from the
    full size: masks drifted towards the right and bottom, ~5.6 px at the far corner of a 4055x3039 frame."""
    w, h = size
    r = 100
    img = np.full((h, w, 3), (232, 228, 236), np.uint8)
    rng = np.random.default_rng(5)
    centres = []
    for cy in range(140, h - 140, 260):
        for cx in range(140, w - 140, 260):
            x, y = cx + int(rng.integers(-20, 21)), cy + int(rng.integers(-20, 21))
            cv2.circle(img, (x, y), r, (205, 120, 170), -1)
            centres.append((x, y))
    centres = np.array(centres, float)
    seg = segment_cells(img, SegmentParams(cell_diameter_hint_px=2 * r))
    assert len(seg.cells) == len(centres)
    offsets = []
    for c in seg.cells:
        ys, xs = np.nonzero(c.mask)
        centroid = np.array([c.bbox[0] + xs.mean(), c.bbox[1] + ys.mean()])
        nearest = centres[np.argmin(((centres - centroid) ** 2).sum(axis=1))]
        if nearest[0] > 2 * w / 3 and nearest[1] > 2 * h / 3:  # the far corner, where drift adds up
            offsets.append(centroid - nearest)
    assert len(offsets) >= 10
    # a drawn disc's pixel centroid sits 0.5 px off its integer centre (pixel centres): allow 1 px
    assert np.abs(np.mean(offsets, axis=0)).max() < 1.0, np.mean(offsets, axis=0)


def test_both_touching_cells_get_the_line_they_were_cut_along():
    """The 1-px cut line between touching cells goes back to both: a dilation of the label image gave it
    to the higher label only, so one mask stopped up to 4 px short of the contact and the other ran past."""
    r, h, w = 45, 960, 1280
    img = np.full((h, w, 3), (200, 225, 205), np.uint8)
    pairs = []
    for y in range(120, h - 100, 200):
        for x in range(120, w - 200, 300):
            left, right = (x, y), (x + 2 * r - 6, y)  # overlapping by 6 px: the contact line at x + r - 3
            for c in (left, right):
                cv2.circle(img, c, r, (190, 120, 150), -1, cv2.LINE_AA)
            pairs.append((left, right, x + r - 3))
    img = np.clip(img + np.random.default_rng(0).normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    seg = segment_cells(img, SegmentParams(cell_diameter_hint_px=2 * r))

    def cell_at(p):
        (hit,) = [c for c in seg.cells if c.bbox[0] <= p[0] < c.bbox[0] + c.bbox[2]
                  and c.bbox[1] <= p[1] < c.bbox[1] + c.bbox[3] and c.mask[p[1] - c.bbox[1], p[0] - c.bbox[0]]]
        return hit

    for left, right, contact in pairs:
        a, b = cell_at(left), cell_at(right)
        assert a is not b
        a_reaches = a.bbox[0] + np.flatnonzero(a.mask[left[1] - a.bbox[1]]).max() + 1
        b_starts = b.bbox[0] + np.flatnonzero(b.mask[right[1] - b.bbox[1]]).min()
        assert a_reaches >= contact - 1 and b_starts <= contact + 1, (left, a_reaches, b_starts, contact)


def _field_stop(rgb: np.ndarray, level: float = 0.0, soft_px: float = 0.0, radius_frac: float = 0.5,
                seed: int = 0) -> np.ndarray:
    """The field as a microscope camera with a field stop sees it: a lit disc (radius a fraction of the
    height) in a dark surround at ``level`` (0-255, with a little sensor noise), with a hard or soft edge."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    d = np.sqrt((xx - w / 2) ** 2 + (yy - h / 2) ** 2) - radius_frac * h
    light = np.clip(-d / soft_px + 0.5, 0, 1) if soft_px else (d < 0).astype(np.float64)
    surround = level + np.random.default_rng(seed).normal(0, 3 if level else 0, (h, w))
    out = rgb * light[..., None] + (surround * (1 - light))[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("level, soft_px", [(0, 0), (12, 0), (12, 40), (25, 40)])
def test_a_round_field_of_view_in_a_dark_surround_counts_the_cells_inside_and_none_in_the_dark(level, soft_px):
    """The black around a field stop divided by a background of ~0 read as the darkest of cells: dozens of
    made-up cells there, and Otsu's threshold pushed above the real cells (23 counted on an IML field, all in
    the black, none of the ~105 inside the disc)."""
    rgb = read_rgb(sorted((FIELDS / "images").glob("*"))[0])
    h, w = rgb.shape[:2]
    full = segment_cells(rgb)
    stopped = _field_stop(rgb, level, soft_px)
    seg = segment_cells(stopped)

    def within(c: Cell, margin: float) -> bool:
        x, y, bw, bh = c.bbox
        return np.hypot(x + bw / 2 - w / 2, y + bh / 2 - h / 2) + max(bw, bh) / 2 < 0.5 * h - margin

    whole = sum(within(c, soft_px / 2) for c in full.cells)  # in full light, all of the cell
    reached = sum(within(c, -0.5 * full.cell_diameter_px) for c in full.cells)  # the edge cuts them at most
    dark = [c for c in seg.cells if (stopped[c.bbox[1]:c.bbox[1] + c.bbox[3], c.bbox[0]:c.bbox[0] + c.bbox[2]]
                                     .max(axis=2)[c.mask] < 60).mean() > 0.5]
    assert dark == []
    assert 0.85 * whole <= len(seg.cells) <= reached, (whole, len(seg.cells), reached)
    assert all(within(c, -0.5 * full.cell_diameter_px) for c in seg.cells)  # none out in the surround


@pytest.mark.parametrize("level", [0, 12])
def test_cells_cut_by_the_edge_of_the_field_of_view_are_dropped_as_at_the_image_border(level):
    """A hard-edged field stop cuts the cells it crosses as the image border does: each cell counted is a
    whole cell of the fully lit field (box IoU >= 0.5 with one; measured 0.60-0.79), not a piece of one
    (7-8 more cells, down to IoU 0.05, when the rim was not treated as a border)."""
    rgb = read_rgb(sorted((FIELDS / "images").glob("*"))[0])
    full = segment_cells(rgb)
    seg = segment_cells(_field_stop(rgb, level, 0))
    iou = box_iou(np.array([c.bbox for c in seg.cells], dtype=float),
                  np.array([c.bbox for c in full.cells], dtype=float))
    assert iou.max(axis=1).min() >= 0.5


def test_the_histogram_quantile_of_uint8_values_is_the_partition_one(monkeypatch):
    import device.segment as seg
    from device.segment import quantile

    rng = np.random.default_rng(3)
    partition = np.partition
    expected = {}
    for values in (rng.integers(0, 256, 10_001).astype(np.uint8), np.full(7, 200, np.uint8),
                   np.array([0, 255], np.uint8), rng.integers(250, 256, 999).astype(np.uint8)):
        for q in (0.0, 0.01, 0.5, 0.99, 1.0):
            k = min(values.size - 1, int(q * values.size))
            expected[values.tobytes(), q] = float(partition(values, k)[k])
    # uint8 values never take the partial sort (2-4x slower): the histogram answers alone
    monkeypatch.setattr(seg.np, "partition", lambda *a, **kw: pytest.fail("np.partition used for uint8 values"))
    for (raw, q), want in expected.items():
        assert quantile(np.frombuffer(raw, np.uint8), q) == want, q
    assert quantile(np.zeros(0, np.uint8), 0.5) == 0.0
    monkeypatch.undo()
    assert quantile(np.array([3.0, 1.0, 2.0]), 0.5) == 2.0  # other types keep the partial sort


def test_a_fields_halvings_made_once_segment_it_as_made_afresh(segmented):
    # the scale search, the quality gate's 640 px copy and the segmentation share one set of halvings
    from device.analysis import AnalysisSettings, _small, image_quality
    from device.segment import estimate_cell_diameter, lit_mask

    for image, _ in segmented.values():
        halvings: list[np.ndarray] = []
        d = estimate_cell_diameter(image, halvings=halvings)
        assert halvings and d == estimate_cell_diameter(image)
        params = SegmentParams(cell_diameter_hint_px=d)
        shared, fresh = segment_cells(image, params, halvings=halvings), segment_cells(image, params)
        assert [c.bbox for c in shared.cells] == [c.bbox for c in fresh.cells]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(shared.cells, fresh.cells, strict=True))
        frame = cv2.resize(image, (1280, 960), interpolation=cv2.INTER_AREA)
        halvings = []
        estimate_cell_diameter(frame, halvings=halvings)
        assert np.array_equal(halvings[0], _small(frame))  # what analyze_field passes the quality gate
        assert image_quality(frame, AnalysisSettings(), d, halvings[0]) == image_quality(frame, AnalysisSettings(), d)
        assert lit_mask(image, d, 0.2) is None  # a field lit to its edges: the early answer


def test_the_lit_mask_early_answer_matches_the_full_one(monkeypatch):
    import device.segment as seg
    from device.segment import lit_mask

    lit = np.full((120, 160, 3), 200, np.uint8)
    monkeypatch.setattr(seg, "quantile", lambda *a: pytest.fail("a field lit to its edges took the full path"))
    assert lit_mask(lit, 9.0, 0.2) is None  # answered from the blurred light's min and max alone
    monkeypatch.undo()

    rng = np.random.default_rng(5)
    for lo in (40, 60, 100, 200):  # a darkest corner at lo against a lamp of 230 (min_frac 0.2 of it: 46)
        img = np.full((120, 160, 3), 230, np.uint8)
        img[:30, :30] = lo
        img = cv2.add(img, rng.integers(0, 3, img.shape).astype(np.uint8))
        m = lit_mask(img, 9.0, 0.2)
        if lo >= 60:
            assert m is None
        else:
            assert m is not None and not m[5, 5] and m[100, 140]


def test_the_darkening_tables_are_the_exact_rounded_quotients():
    """The transmission 255 * I / B and the score (765 - sum) / 2, rounded half to even (as OpenCV's
    cv2.divide and cv2.transform round on x86-64) and capped at 255, for every pixel value and background."""
    from fractions import Fraction

    from device.segment import _SCORE_SCALE, _darkening_luts

    assert _SCORE_SCALE == 255 / 2  # the score (3 - the transmissions' sum / 255) * _SCORE_SCALE is in halves
    quotient, score_of_sum = _darkening_luts()
    assert not quotient.flags.writeable and not score_of_sum.flags.writeable  # shared by every call
    want = [min(255, round(Fraction(255 * i, max(b, 1)))) for i in range(256) for b in range(256)]
    assert quotient.tolist() == want
    assert score_of_sum.tolist() == [min(255, round(Fraction(765 - s, 2))) for s in range(766)]


def test_the_field_path_uses_none_of_the_opencv_kernels_found_to_round_differently_on_arm():
    """cv2.divide, cv2.transform and INTER_LINEAR resizes of uint8 images rounded a pixel here and there one
    way on x86-64 and the other on the Pi's ARM cores (measured under qemu: 1 in 140 transmission pixels,
    then every cell outline, one cell in 93 and scores by up to 0.08). INTER_LINEAR_EXACT and integer
    tables gave the same bits on both for 64 fields. A guard against those kernels coming back (and their
    like: a resize without an interpolation named is INTER_LINEAR); what runs on ARM is checked under qemu
    (README, "The same results on the Pi")."""
    import ast

    root = Path(__file__).resolve().parents[1] / "device"
    banned = {"INTER_LINEAR", "INTER_CUBIC", "INTER_LANCZOS4", "divide", "transform", "multiply", "addWeighted",
              "warpAffine", "warpPerspective", "remap"}
    for name in ("segment.py", "preprocess.py", "analysis.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            where = f"device/{name}:{getattr(node, 'lineno', '?')}"
            assert not (isinstance(node, ast.ImportFrom) and node.module == "cv2"), where
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cv2":
                assert node.attr not in banned, f"{where}: cv2.{node.attr}"
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "cv2.resize":
                assert any(k.arg == "interpolation" for k in node.keywords), f"{where}: a resize names no interpolation"


def test_white_text_burned_in_does_not_darken_the_plasma_around_it():
    """The background is a closing (the brightest light over a cell's width): white text or a scale bar a
    camera burns in was taken for the light, the plasma beside it read as dark, and on an IML field two cells
    and the text merged into one 184 x 119 px "cell". Now nothing is taken as brighter than the plasma."""
    from device.imageio import read_rgb
    from device.segment import _darkening, estimate_cell_diameter

    samples = Path(__file__).resolve().parent.parent / "device" / "samples"
    rgb = (read_rgb(sorted(samples.glob("*.jpg"))[2]) * 0.85).astype(np.uint8)  # plasma ~210, as IML's
    scale = 24 / estimate_cell_diameter(rgb)
    work = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = work.shape[:2]
    x0, y0 = w // 2 - 40, h // 2 - 4
    text = work.copy()
    cv2.rectangle(text, (x0, y0), (x0 + 80, y0 + 8), (255, 255, 255), -1)  # a bar of 3 x 1/3 cells
    near = np.zeros((h, w), bool)
    near[y0 - 24 : y0 + 33, x0 - 24 : x0 + 105] = True  # a cell's width around it...
    near[y0 : y0 + 9, x0 : x0 + 81] = False
    _, before = _darkening(work, 2.5 * 24)
    _, after = _darkening(text, 2.5 * 24)
    plasma = near & (before < 20)  # ...where the field is plasma
    assert plasma.sum() > 2000
    assert (after[plasma] > 40).mean() < 0.01  # 98% of it read darker than 40 before


def test_a_cell_the_border_cuts_is_dropped_even_when_split_in_two():
    """In the centre 1280 x 960 of a BBBC041 field, a cell 56% in view (at 1379, 723 of the field, 109 x 117
    px) was kept as two cells: each half touched the border along less than the limit, the cell more."""
    from device.imageio import read_rgb

    rgb = read_rgb(FIELDS / "images" / "00d04a90-80e5-4bce-9511-1b64eabb7a47.webp")
    h, w = rgb.shape[:2]
    x0, y0 = (w - 1280) // 2, (h - 960) // 2
    whole = segment_cells(rgb).cells
    assert any(abs(c.bbox[0] - 1379) < 8 and abs(c.bbox[1] - 723) < 8 for c in whole)  # seen whole in the field
    cut = segment_cells(np.ascontiguousarray(rgb[y0 : y0 + 960, x0 : x0 + 1280])).cells
    inside = [c.bbox for c in cut if c.bbox[0] + x0 >= 1379 - 4 and c.bbox[1] + y0 + c.bbox[3] <= 723 + 117 + 4
              and c.bbox[1] + y0 >= 723 - 4]
    assert inside == []
    # a whole cell grazing the crop's edge (at 160, 650 of the field: 29 px along it) is still kept
    assert any(abs(c.bbox[0] + x0 - 160) < 6 and abs(c.bbox[1] + y0 - 650) < 6 for c in cut)


def test_a_small_cell_grazing_the_border_is_kept_beside_a_chain_to_a_cut_one():
    """Drawn: a small whole cell 1 px past the left border, a chain of touching cells, and a half cell cut
    by the right border 800 px away. Weighing every fragment of the clump together dropped the small cell
    for the half cell's contact; only fragments touching one another are weighed together."""
    h, w = 400, 900
    img = np.full((h, w, 3), (236, 226, 232), np.uint8)
    colour = (196, 140, 165)
    cv2.circle(img, (22, 200), 23, colour, -1)
    for x in np.linspace(72, 843, 15).round().astype(int):
        cv2.circle(img, (int(x), 200), 30, colour, -1)
    cv2.circle(img, (w, 200), 30, colour, -1)
    for x in range(80, w - 60, 90):  # loose whole cells: the typical area
        cv2.circle(img, (x, 60), 30, colour, -1)
        cv2.circle(img, (x + 40, 340), 30, colour, -1)
    img = np.clip(img + np.random.default_rng(0).normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    cells = segment_cells(img, SegmentParams(cell_diameter_hint_px=60.0)).cells
    assert any(c.bbox[0] == 0 and 170 < c.bbox[1] + c.bbox[3] / 2 < 230 for c in cells)  # the small cell
    assert not any(c.bbox[0] + c.bbox[2] >= w - 1 and 170 < c.bbox[1] + c.bbox[3] / 2 < 230 for c in cells)
