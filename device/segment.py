"""Classical red-cell segmentation of a brightfield thin-smear field (OpenCV + numpy only).

The pipeline, all at a reduced working resolution where a red cell is about 30 px across:

1. **Scale.** A quick pass on a small copy of the field finds dark blobs and reads the typical cell
   radius off the peaks of their distance transform; the field is then resized so that a cell is
   ``target_cell_diameter_px`` across. Every size below is a fraction of that estimated cell size, so
   the same parameters work for other cameras and objectives.
2. **Foreground.** The background (illumination) is estimated per channel by a large grey-level
   closing of a small copy of the field, and each pixel's darkening ``1 - I/background`` is summed over
   R, G and B. That makes pink (Giemsa) and blue (BBBC041) stains, and vignetted fields, look the same:
   cells are dark on a flat zero. Otsu on that score (scaled down to catch pale, enlarged infected cells),
   a small closing to shut open outlines, and filling of cell-sized holes (central pallor, vacuoles).
3. **Split.** Touching and overlapping cells are split by a marker-controlled watershed on the distance
   transform of the foreground (markers: distance peaks at least ``marker_min_separation`` apart), in
   the spirit of NLM's Malaria Screener (green channel, Otsu, LoG markers, watershed). Every pixel
   outside the foreground is one background marker, so the flood cannot leak out of the cells.
4. **Filter.** Dropped: pieces smaller than a platelet-sized fraction of a cell (platelets, debris,
   text), thin or elongated pieces (scale bars, fibres), pieces far larger than a cell (unsplit clumps),
   pieces touching the image border (cut cells cannot be judged), and pieces holding a large solid
   dark-purple nucleus (white cells).

Boxes and masks are mapped back to full-resolution pixels. :func:`segment_cells` is a pure function;
nothing happens at import time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentParams:
    """Tunables of :func:`segment_cells`. Sizes are fractions of the estimated cell diameter or area."""

    # Working resolution: ~30 px per cell keeps outlines and the gaps between touching cells while the
    # field shrinks ~10x in pixels compared with a 1280x960 frame at 100x.
    target_cell_diameter_px: float = 30.0
    # Full-resolution cell diameter when the optics are fixed and known; None estimates it per field.
    cell_diameter_hint_px: float | None = None
    # Long side of the quick copy used to estimate the cell size (cells stay >= ~10 px across on it).
    probe_long_side_px: int = 480
    # Fallback when the probe finds too few blobs to estimate a size: a fraction of the long side.
    fallback_cell_diameter_frac_of_long_side: float = 0.06
    # Background closing window: wider than a cell so it always reaches the bright plasma between cells.
    background_window_frac_of_diameter: float = 2.5
    # Otsu separates cells from plasma; scaling it down keeps pale (often infected) cells whole.
    threshold_frac_of_otsu: float = 0.7
    # A field whose cells darken the light by less than this (summed over R, G, B) is treated as blank.
    min_darkening_sum: float = 0.12
    # Closing that shuts pale cells' open outlines before hole filling.
    close_frac_of_diameter: float = 0.15
    # Holes up to this size are filled (central pallor, vacuoles); larger ones are plasma between cells.
    max_hole_area_frac_of_typical: float = 0.6
    # Watershed markers: distance-transform peaks at least this far apart...
    marker_min_separation_frac_of_diameter: float = 0.45
    # ...and at least this deep (a cell's distance peak is ~0.5 diameter; thin debris stays below).
    marker_min_depth_frac_of_diameter: float = 0.18
    # Platelets and debris are far smaller than a red cell.
    min_area_frac_of_typical: float = 0.3
    # Enlarged infected P. vivax cells reach ~2x the area; beyond this it is a clump or a white cell.
    max_area_frac_of_typical: float = 3.5
    # Scale bars and fibres: a box this elongated is not a red cell.
    max_aspect_ratio: float = 2.5
    # A piece touching a border closer than this is cut by the field edge and dropped.
    border_margin_frac_of_diameter: float = 0.02
    drop_border_cells: bool = True
    # White-cell nucleus: pixels far more purple (green darkened more than red) than the red cells...
    nucleus_purple_excess: float = 0.3
    # ...and dark in green...
    nucleus_min_green_darkening: float = 0.7
    # ...forming solid blobs that survive an opening this wide (parasite dots do not)...
    nucleus_open_frac_of_diameter: float = 0.2
    # ...covering at least this much of a typical cell: then the piece is (part of) a white cell.
    nucleus_min_area_frac_of_typical: float = 0.3
    seam_width_frac_of_diameter: float = 0.2
    seam_depth_frac: float = 0.15


@dataclass(frozen=True)
class Cell:
    """One segmented red cell, in full-field pixels."""

    bbox: tuple[int, int, int, int]  # x, y, w, h
    mask: np.ndarray  # bool, shape (h, w): this cell's mask inside its box
    area_px: int


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`segment_cells`."""

    cells: list[Cell]
    cell_diameter_px: float  # typical red-cell diameter in full-field pixels; 0.0 when no cells were found
    foreground_frac: float  # fraction of the field covered by the kept cells' masks
    timing_ms: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t0 = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._last) * 1000.0
        self._last = now

    def total(self) -> dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self._t0) * 1000.0
        return self.ms


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def _ellipse(diameter: float) -> np.ndarray:
    k = _odd(diameter)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def _background(image: np.ndarray, window_px: float) -> np.ndarray:
    """Per-channel illumination: a grey-level closing wider than a cell, done on a 4x smaller copy."""
    h, w = image.shape[:2]
    f = 4.0
    small = cv2.resize(image, (max(1, int(w / f)), max(1, int(h / f))), interpolation=cv2.INTER_AREA)
    k = _ellipse(max(3.0, window_px / f))
    bright = cv2.dilate(small, k)
    bright = cv2.blur(bright, (k.shape[1], k.shape[0]))
    return cv2.resize(bright, (w, h), interpolation=cv2.INTER_LINEAR)


def _darkening(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-channel ``1 - I / background`` in [0, 1], float32, HxWx3."""
    img = image.astype(np.float32)
    bg = np.maximum(background.astype(np.float32), 1.0)
    d = 1.0 - img / bg
    np.clip(d, 0.0, 1.0, out=d)
    return d


# Darkening sums live in [0, 3]; this maps them to uint8 for Otsu with ~0.01 resolution.
_SCORE_TO_U8 = 255.0 / 2.0


def _foreground(score_u8: np.ndarray, params: SegmentParams, diameter_px: float) -> tuple[np.ndarray, float]:
    """Binary foreground (uint8 0/255) and the threshold used (darkening-sum units)."""
    otsu, _ = cv2.threshold(score_u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(otsu * params.threshold_frac_of_otsu, params.min_darkening_sum * _SCORE_TO_U8)
    fg = (score_u8 > thr).astype(np.uint8) * 255
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _ellipse(params.close_frac_of_diameter * diameter_px))
    typical_area = math.pi * diameter_px**2 / 4.0
    fg = _fill_holes(fg, params.max_hole_area_frac_of_typical * typical_area)
    return fg, thr / _SCORE_TO_U8


def _fill_holes(fg: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background pockets enclosed by foreground and smaller than ``max_area_px``."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cv2.bitwise_not(fg), connectivity=4)
    if n <= 1:
        return fg
    h, w = fg.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches = (x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)
    fill = (~touches) & (area <= max_area_px)
    fill[0] = False  # label 0 is the foreground itself
    if not fill.any():
        return fg
    out = fg.copy()
    out[fill[lab]] = 255
    return out


def _estimate_diameter(fg: np.ndarray) -> float | None:
    """Typical cell diameter (px of ``fg``) from the distance-transform peaks of a foreground mask."""
    dt = cv2.distanceTransform(fg, cv2.DIST_L2, 3)
    peaks = (dt >= cv2.dilate(dt, np.ones((5, 5), np.uint8))) & (dt >= 2.0)
    vals = dt[peaks]
    if vals.size < 5:
        return None
    # Plateaus and debris give many small peaks; the cells are the upper, dense part of the spread.
    hi = np.percentile(vals, 90)
    vals = vals[vals >= 0.5 * hi]
    return float(2.0 * np.median(vals))


def _markers(dt: np.ndarray, params: SegmentParams, diameter_px: float) -> tuple[np.ndarray, int]:
    sep = params.marker_min_separation_frac_of_diameter * diameter_px
    depth = params.marker_min_depth_frac_of_diameter * diameter_px
    smooth = cv2.GaussianBlur(dt, (0, 0), max(0.5, 0.05 * diameter_px))
    peaks = (smooth >= cv2.dilate(smooth, _ellipse(sep)) - 1e-3) & (dt >= depth)
    n, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    return markers, n - 1


def _seams(score_u8: np.ndarray, diameter_px: float, params: SegmentParams) -> np.ndarray:
    """Thin light lines inside dark regions: where two touching cells meet."""
    k = _ellipse(params.seam_width_frac_of_diameter * diameter_px)
    closed = cv2.morphologyEx(score_u8, cv2.MORPH_CLOSE, k)
    valley = cv2.subtract(closed, score_u8)
    return valley > params.seam_depth_frac * np.float32(closed)


_ORACLE = []
_DEBUG = {}


def _radial_votes(score_u8, diameter_px):
    import os
    sm = cv2.GaussianBlur(score_u8, (0, 0), max(1.0, 0.06 * diameter_px)).astype(np.float32)
    gx = cv2.Sobel(sm, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(sm, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    mthr = float(os.environ.get("GT", "0.3")) * np.percentile(mag, 99)
    ys, xs = np.nonzero(mag > mthr)
    m = mag[ys, xs]
    ux, uy = gx[ys, xs] / m, gy[ys, xs] / m
    h, w = score_u8.shape
    acc = np.zeros(h * w, np.float32)
    r0 = 0.5 * diameter_px
    for f in (0.7, 0.85, 1.0, 1.15):
        cx = np.rint(xs + f * r0 * ux).astype(np.int32)
        cy = np.rint(ys + f * r0 * uy).astype(np.int32)
        ok = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        acc += np.bincount(cy[ok] * w + cx[ok], minlength=h * w).astype(np.float32)
    acc = acc.reshape(h, w)
    return cv2.GaussianBlur(acc, (0, 0), max(1.0, float(os.environ.get("AS", "0.08")) * diameter_px))


def _split(fg, score_u8, work, params, diameter_px):
    import os
    mode = os.environ.get("MARK", "dt")
    base = fg
    if "seam" in mode:
        seams = _seams(score_u8, diameter_px, params)
        base = fg.copy()
        base[seams] = 0
    dt = cv2.distanceTransform(base, cv2.DIST_L2, 5)
    if mode.startswith("log"):
        sig = float(os.environ.get("SIG", "0.25")) * diameter_px
        sm = cv2.GaussianBlur(score_u8.astype(np.float32), (0, 0), sig)
        if mode == "logdt":
            sm = sm / (sm.max() + 1e-6) + float(os.environ.get("W", "1")) * dt / (0.5 * diameter_px)
        sep = params.marker_min_separation_frac_of_diameter * diameter_px
        peaks = (sm >= cv2.dilate(sm, _ellipse(sep)) - 1e-4) & (dt >= params.marker_min_depth_frac_of_diameter * diameter_px)
        n, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    elif mode.startswith("frst"):
        acc = _radial_votes(score_u8, diameter_px)
        sep = params.marker_min_separation_frac_of_diameter * diameter_px
        if mode == "frstdt":
            acc = acc / (np.percentile(acc[fg > 0], 99) + 1e-6) + float(os.environ.get("W", "0.5")) * dt / (0.5 * diameter_px)
        thr = float(os.environ.get("AT", "0.25")) * np.percentile(acc[fg > 0], 99)
        peaks = (acc >= cv2.dilate(acc, _ellipse(sep)) - 1e-6) & (acc > thr) & (fg > 0)
        n, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
        n -= 1
        _DEBUG["acc"] = acc
        _DEBUG["markers"] = markers
    elif mode == "oracle":
        markers = np.zeros(fg.shape, np.int32)
        for i, (cx, cy) in enumerate(_ORACLE):
            X, Y = int(cx), int(cy)
            if 0 <= X < fg.shape[1] and 0 <= Y < fg.shape[0]:
                cv2.circle(markers, (X, Y), 2, i + 1, -1)
        n = len(_ORACLE)
    else:
        markers, n = _markers(dt, params, diameter_px)
    how = os.environ.get("SPLIT", "vor")
    if how == "vor":
        src = np.where(markers > 0, 0, 255).astype(np.uint8)
        _, vl = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
        lab = vl.astype(np.int32) + 1
        lab[fg == 0] = 0
        edge = np.zeros(fg.shape, bool)
        edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        edge[1:, :] |= lab[1:, :] != lab[:-1, :]
        lab[edge] = 0
        return lab
    lab = np.where(markers > 0, markers + 1, 0).astype(np.int32)
    lab[fg == 0] = 1
    img = np.ascontiguousarray(work) if how == "ws" else cv2.merge([score_u8] * 3)
    cv2.watershed(img, lab)
    lab[lab == 1] = 0
    lab[lab < 0] = 0
    return lab


def _nucleus_mask(dark: np.ndarray, params: SegmentParams, diameter_px: float) -> np.ndarray:
    """Solid dark-purple blobs (white-cell nuclei): green darkened far more than red, and dark."""
    d_r, d_g = dark[:, :, 0], dark[:, :, 1]
    purple = ((d_g - d_r) > params.nucleus_purple_excess) & (d_g > params.nucleus_min_green_darkening)
    m = purple.astype(np.uint8)
    return cv2.morphologyEx(m, cv2.MORPH_OPEN, _ellipse(params.nucleus_open_frac_of_diameter * diameter_px))


def segment_cells(image_rgb: np.ndarray, params: SegmentParams = SegmentParams()) -> Segmentation:  # noqa: B008
    """Segment the red blood cells of one brightfield thin-smear field.

    Args:
        image_rgb: HxWx3 uint8 RGB field.
        params: tunables; the defaults suit 100x oil fields of Giemsa (pink) and BBBC041 (blue) smears.

    Returns:
        A :class:`Segmentation`: one :class:`Cell` per red cell (box, box-sized mask, area) in
        full-field pixels, the typical cell diameter, the fraction of the field covered by cells, and
        per-stage timings in milliseconds.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    timer = _Timer()
    full_h, full_w = image_rgb.shape[:2]
    long_side = max(full_h, full_w)

    # 1. Scale.
    if params.cell_diameter_hint_px:
        diameter_full = float(params.cell_diameter_hint_px)
    else:
        diameter_full = _probe_diameter(image_rgb, params)
    scale = min(1.0, params.target_cell_diameter_px / diameter_full)
    timer.lap("scale")

    work = _resize(image_rgb, scale)
    d_work = diameter_full * scale
    timer.lap("resize")

    # 2. Foreground.
    bg = _background(work, params.background_window_frac_of_diameter * d_work)
    dark = _darkening(work, bg)
    score = cv2.convertScaleAbs(dark.sum(axis=2), alpha=_SCORE_TO_U8)
    fg, thr = _foreground(score, params, d_work)
    timer.lap("foreground")

    # 3. Split.
    lab = _split(fg, score, work, params, d_work)
    timer.lap("split")

    # 4. Filter.
    keep, cc, stats, typical_area = _filter(lab, dark, params, d_work)
    timer.lap("filter")

    cells = _map_back(cc, fg, stats, keep, scale, (full_h, full_w))
    covered = sum(c.area_px for c in cells)
    diameter_out = 2.0 * math.sqrt(typical_area / math.pi) / scale if cells else 0.0
    timer.lap("map_back")
    logger.debug(
        "segment: %d cells, diameter %.1f px (probe %.1f), scale %.3f, threshold %.3f",
        len(cells), diameter_out, diameter_full, scale, thr,
    )
    return Segmentation(
        cells=cells,
        cell_diameter_px=diameter_out,
        foreground_frac=covered / float(full_h * full_w),
        timing_ms=timer.total(),
    )


def _probe_diameter(image_rgb: np.ndarray, params: SegmentParams) -> float:
    long_side = max(image_rgb.shape[:2])
    s0 = min(1.0, params.probe_long_side_px / long_side)
    probe = _resize(image_rgb, s0)
    fallback = params.fallback_cell_diameter_frac_of_long_side * long_side
    # Background for the probe: a closing as wide as the fallback guess of two cells.
    bg = _background(probe, 2.0 * fallback * s0)
    score = cv2.convertScaleAbs(_darkening(probe, bg).sum(axis=2), alpha=_SCORE_TO_U8)
    otsu, _ = cv2.threshold(score, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if otsu < params.min_darkening_sum * _SCORE_TO_U8:
        return fallback
    fg = (score > otsu * params.threshold_frac_of_otsu).astype(np.uint8) * 255
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    fg = _fill_holes(fg, (fallback * s0) ** 2)
    d = _estimate_diameter(fg)
    if d is None:
        return fallback
    return d / s0


def _filter(
    lab: np.ndarray, dark: np.ndarray, params: SegmentParams, d_work: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Decide which watershed regions are red cells. Returns (keep flags, cc labels, cc stats, typical area)."""
    n, cc, stats, _ = cv2.connectedComponentsWithStats((lab > 0).astype(np.uint8), connectivity=4)
    h, w = lab.shape
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    keep = np.ones(n, dtype=bool)
    keep[0] = False
    nominal_area = math.pi * d_work**2 / 4.0
    # The typical area: median of plausible pieces, so that debris and clumps do not pull it.
    plausible = keep & (area >= 0.3 * nominal_area) & (area <= 3.0 * nominal_area)
    typical_area = float(np.median(area[plausible])) if plausible.any() else nominal_area
    keep &= area >= params.min_area_frac_of_typical * typical_area
    keep &= area <= params.max_area_frac_of_typical * typical_area
    aspect = np.maximum(bw, bh) / np.maximum(np.minimum(bw, bh), 1)
    keep &= aspect <= params.max_aspect_ratio
    if params.drop_border_cells:
        m = max(1, int(round(params.border_margin_frac_of_diameter * d_work)))
        keep &= (x >= m) & (y >= m) & (x + bw <= w - m) & (y + bh <= h - m)
    nucleus = _nucleus_mask(dark, params, d_work)
    if nucleus.any():
        nuc_px = np.bincount(cc[nucleus > 0], minlength=n)
        keep &= nuc_px < params.nucleus_min_area_frac_of_typical * typical_area
    if plausible.sum() < 3:
        typical_area = float(np.median(area[keep])) if keep.any() else nominal_area
    return keep, cc, stats, typical_area


def _map_back(
    cc: np.ndarray,
    fg: np.ndarray,
    stats: np.ndarray,
    keep: np.ndarray,
    scale: float,
    full_shape: tuple[int, int],
) -> list[Cell]:
    """Full-resolution boxes and masks of the kept regions."""
    full_h, full_w = full_shape
    h, w = cc.shape
    cells: list[Cell] = []
    grow = np.ones((3, 3), np.uint8)
    for k in np.flatnonzero(keep):
        x, y, bw, bh = (int(v) for v in stats[k, :4])
        # One pixel of margin so the watershed line between touching cells is given back to both.
        x0, y0, x1, y1 = max(0, x - 1), max(0, y - 1), min(w, x + bw + 1), min(h, y + bh + 1)
        sub = (cc[y0:y1, x0:x1] == k).astype(np.uint8)
        sub = cv2.dilate(sub, grow) & (fg[y0:y1, x0:x1] > 0)
        fx0, fy0 = int(math.floor(x0 / scale)), int(math.floor(y0 / scale))
        fx1, fy1 = min(full_w, int(math.ceil(x1 / scale))), min(full_h, int(math.ceil(y1 / scale)))
        if scale != 1.0:
            big = cv2.resize(sub * 255, (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_LINEAR) > 127
        else:
            big = sub.astype(bool)
        ys, xs = np.nonzero(big.any(axis=1))[0], np.nonzero(big.any(axis=0))[0]
        if ys.size == 0:
            continue
        ty0, ty1, tx0, tx1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        mask = np.ascontiguousarray(big[ty0:ty1, tx0:tx1])
        cells.append(
            Cell(
                bbox=(fx0 + int(tx0), fy0 + int(ty0), int(tx1 - tx0), int(ty1 - ty0)),
                mask=mask,
                area_px=int(mask.sum()),
            )
        )
    return cells
