"""Classical red-cell segmentation of a brightfield thin-smear field (OpenCV + numpy only).

All the work happens at a reduced resolution where a red cell is ``target_cell_diameter_px`` across;
boxes and masks are mapped back to full-resolution pixels at the end.

1. **Scale.** Red cells are discs. On a small copy of the field every strong edge votes for a centre at
   distance R along its gradient (a radial-symmetry transform); at the true radius the votes pile up
   into sharp peaks. The radius with the most concentrated votes is the cell radius, whether the cells
   lie apart or in dense overlapping fields (a blob-size or distance-transform estimate fails there).
   The field is resized so that a cell has the target size, and every size below is a fraction of it,
   so no pixel constant depends on the camera or objective.
2. **Foreground.** Illumination is a grey-level closing wider than a cell (it reaches the plasma between
   cells), per channel; each pixel's darkening ``1 - I/background`` is summed over R, G and B, so pink
   (Giemsa) and blue (BBBC041) stains and vignetted fields all become dark cells on a flat zero. Where
   no light falls (the black around a round field of view) there is nothing to see: left out, and its
   edge cuts cells as the image border does. A threshold a little under Otsu's on that score (over the
   lit part), then filling of holes up to a fraction of a cell (central pallor, vacuoles).
3. **Split.** One marker per cell: peaks of the radial votes at the working scale (weighted by edge
   strength) plus a little of the distance transform (which favours the centres of big round cells).
   Votes find the cells of tight clusters and overlapping pairs, where distance-transform peaks alone
   merge them -- the role of the LoG markers in NLM's Malaria Screener (green channel, Otsu, LoG
   markers, watershed). Each foreground pixel goes to its nearest marker (a Voronoi split inside the
   foreground; for two overlapping discs of equal size the cut runs through both crossing points of
   their outlines). Neighbouring pieces that share a long border and together are no bigger than a
   cell are merged again (one cell cut by two markers).
4. **Filter.** Dropped: pieces much smaller than a cell (platelets, debris, text), elongated pieces
   (scale bars, fibres), pieces far larger than a cell (unsplit clumps), pieces cut by the image border,
   and pieces holding part of a large, solid, dark-purple nucleus (white cells).

:func:`segment_cells` is a pure function; nothing happens at import time.
"""

from __future__ import annotations

import functools
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

    # Working resolution: a cell ~24 px across keeps the outlines and the seams between touching cells
    # (22-38 px measured the same F1), and a 1280x960 frame at 100x oil shrinks ~10x in pixels.
    target_cell_diameter_px: float = 24.0
    # Full-resolution cell diameter when the optics are fixed and known; None estimates it per field.
    cell_diameter_hint_px: float | None = None
    # Long side of the small copy on which the cell size is estimated (cells stay >= ~10 px there).
    probe_long_side_px: int = 320
    # Range searched for the cell diameter, as fractions of the field's long side (40x ... 200x).
    min_diameter_frac_of_long_side: float = 0.02
    max_diameter_frac_of_long_side: float = 0.2
    # Radii tried in that range (geometric steps, ~22% apart; the peak is refined by a parabola).
    scale_search_steps: int = 12
    # Background closing window: wider than a cell so it always reaches the plasma between cells.
    background_window_frac_of_diameter: float = 2.5
    # Foreground threshold as a multiple of Otsu's: in-focus cells darken >= 1.3x Otsu (BBBC041, IML);
    # a little below 1 keeps more of pale infected cells while plasma and most ghost cells stay out.
    threshold_frac_of_otsu: float = 0.9
    # A field whose objects darken the light by less than this (summed over R, G, B) is blank.
    min_darkening_sum: float = 0.15
    # Holes up to this size are filled (central pallor, vacuoles); larger ones are plasma between cells.
    max_hole_area_frac_of_typical: float = 0.6
    # Edges vote for a centre at these fractions of the cell radius (crenated ... enlarged cells).
    vote_radius_fracs: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15)
    # Edges weaker than this fraction of the field's strong edges (99th percentile) do not vote.
    vote_min_edge_frac: float = 0.3
    # Weight of the distance transform (in cell radii) against the normalised votes in the marker map.
    marker_distance_weight: float = 0.5
    # Markers: a peak within this distance of a stronger peak is the same cell (overlapping cells'
    # centres lie >= ~0.5 diameter apart)...
    marker_min_separation_frac_of_diameter: float = 0.35
    # ...and a peak must reach this fraction of the field's strong peaks (99th percentile in cells).
    marker_min_strength_frac: float = 0.25
    # Neighbouring pieces are merged when their union is at most this big (0 disables merging)...
    merge_max_area_frac_of_typical: float = 1.6
    # ...and their shared border is at least this fraction of the smaller piece's width (two halves of
    # one cell share a border as long as the cell is wide; two cells meet at a neck or a short chord).
    merge_min_border_frac_of_width: float = 1.0
    # Platelets and debris are far smaller than a red cell.
    min_area_frac_of_typical: float = 0.3
    # Enlarged infected P. vivax cells reach ~2-3x the area; beyond this it is a clump or a white cell.
    max_area_frac_of_typical: float = 3.5
    # Scale bars and fibres: a box this elongated is not a red cell.
    max_aspect_ratio: float = 2.5
    # Light: a microscope camera often sees the round field of view in a black surround (a field stop, an
    # eyepiece adapter). Where the light, averaged over a cell, stays below this fraction of the field's
    # plasma in every channel (and the dark reaches the image border), there is no smear to see: no cell is
    # found there, and a cell it cuts is dropped like one at the border (the 64 BBBC041 and IML fields:
    # >= 0.29; a surround 0-0.15).
    min_light_frac_of_plasma: float = 0.2
    # Cells cut by the image border cannot be judged (shape, content) and are dropped...
    drop_border_cells: bool = True
    # ...when they touch it along more than this (a cell grazing the edge is whole).
    max_border_contact_frac_of_diameter: float = 0.3
    # White-cell nucleus: pixels passing far less green light than the field's red cells do (chromatin
    # is the darkest thing in a Giemsa field; relative, because some smears stain red cells deep
    # magenta)...
    nucleus_max_green_transmission_frac_of_cells: float = 0.35
    # ...and purple, not black or blue: red transmission exceeds green by this much (0-255; text, scale
    # bars and BBBC041's dark blue cells pass red and green alike)...
    nucleus_min_purple_excess: int = 20
    # ...forming solid blobs that survive an opening this wide (parasite dots do not)...
    nucleus_open_frac_of_diameter: float = 0.2
    # ...adding up (lobes within 0.3 cell of each other) to at least this much of a typical cell: a white
    # cell, and every piece holding part of it is dropped. A schizont's chromatin reached 0.46 on IML.
    nucleus_min_area_frac_of_typical: float = 0.55


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
    # Typical red-cell (outline) diameter in full-field pixels that the sizes were scaled to: the hint,
    # or the per-field estimate. 0.0 for a blank field.
    cell_diameter_px: float
    foreground_frac: float  # fraction of the field covered by the kept cells' masks
    timing_ms: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t0 = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = (now - self._last) * 1000.0
        self._last = now

    def total(self) -> dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self._t0) * 1000.0
        return self.ms


def segment_cells(
    image_rgb: np.ndarray,
    params: SegmentParams = SegmentParams(),  # noqa: B008
    *,
    halvings: list[np.ndarray] | None = None,
) -> Segmentation:
    """Segment the red blood cells of one brightfield thin-smear field.

    Args:
        image_rgb: HxWx3 uint8 RGB field.
        params: tunables; the defaults suit 100x oil fields of Giemsa (pink) and BBBC041 (blue) smears.

    Returns:
        A :class:`Segmentation`: one :class:`Cell` per red cell (box, box-sized mask, area) in
        full-field pixels, the typical cell diameter, the fraction of the field covered by cells, and
        per-stage timings in milliseconds (``scale``, ``resize``, ``foreground``, ``split``, ``filter``,
        ``map_back``, ``total``).

    Raises:
        ValueError: when the image is not HxWx3 uint8.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    timer = _Timer()
    full_h, full_w = image_rgb.shape[:2]

    # 1. Scale.
    if params.cell_diameter_hint_px:
        diameter_full: float | None = float(params.cell_diameter_hint_px)
    else:
        diameter_full = _estimate_diameter(image_rgb, params, halvings)
    timer.lap("scale")
    if diameter_full is None:
        logger.debug("segment: blank field (no contrast)")
        return Segmentation(cells=[], cell_diameter_px=0.0, foreground_frac=0.0, timing_ms=timer.total())
    work, (sx, sy) = _shrink(image_rgb, min(1.0, params.target_cell_diameter_px / diameter_full), halvings)
    d_work = diameter_full * 0.5 * (sx + sy)
    nominal_area = math.pi * d_work**2 / 4.0
    timer.lap("resize")

    # 2. Foreground.
    transmission, score = _darkening(work, params.background_window_frac_of_diameter * d_work)
    lit = _blank_unlit(work, score, d_work, params.min_light_frac_of_plasma)
    lit_scores = score if lit is None else score[lit > 0].reshape(-1, 1)
    otsu, _ = cv2.threshold(lit_scores, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(otsu * params.threshold_frac_of_otsu, params.min_darkening_sum * _SCORE_SCALE)
    fg = (score > thr).astype(np.uint8) * 255
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = _fill_holes(fg, params.max_hole_area_frac_of_typical * nominal_area)
    timer.lap("foreground")

    # 3. Split.
    dt = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
    markers = _markers(score, fg, dt, params, d_work)
    pieces = _split(fg, markers, params, d_work)
    timer.lap("split")

    # 4. Filter.
    keep, labels, stats, typical_area = _filter(pieces, transmission, fg, params, d_work, lit)
    timer.lap("filter")

    cells = _map_back(labels, fg, stats, keep, (sx, sy), (full_h, full_w))
    timer.lap("map_back")
    covered = sum(c.area_px for c in cells)
    logger.debug(
        "segment: %d cells, diameter %.1f px, working %dx%d, threshold %.0f, typical area %.0f px",
        len(cells), diameter_full, work.shape[1], work.shape[0], thr, typical_area,
    )
    return Segmentation(
        cells=cells,
        cell_diameter_px=float(diameter_full),
        foreground_frac=covered / float(full_h * full_w),
        timing_ms=timer.total(),
    )


# --- helpers -----------------------------------------------------------------------------------------

# The darkening score is (3 - sum of R, G, B transmissions) * 127.5, as uint8: 0 = plasma, 255 = black.
_SCORE_SCALE = 127.5
FRAGMENT_AREA_FRAC = 0.75  # a piece at the border under this much of a typical cell is part of a cut one
PLASMA_QUANTILE = 0.98  # of each channel on the background's small copy: the plasma's light...
PLASMA_MARGIN = 8  # ...and this much over it (0-255): the plasma's own spread (vignetting) is not cut


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def _ellipse(diameter: float) -> np.ndarray:
    k = _odd(diameter)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile of a 1-D array by partial sort (np.percentile sorts; this is O(n))."""
    if values.size == 0:
        return 0.0
    k = min(values.size - 1, int(q * values.size))
    if values.dtype == np.uint8:  # the same k-th smallest from a histogram: 2-4x faster than a partial sort
        return float(np.searchsorted(np.cumsum(np.bincount(values.ravel(), minlength=256)), k + 1))
    return float(np.partition(values, k)[k])


def _shrink(
    image: np.ndarray, scale: float, halvings: list[np.ndarray] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Downscale by ``scale`` (<= 1): exact halvings with INTER_AREA (its fast path), then INTER_LINEAR_EXACT.

    Returns the small image and its exact scale (x, y) against the input: an odd side is first padded
    by repeating its last row or column, so every halving maps 2 input pixels onto 1 from the same
    origin and nothing is dropped (cropping the odd pixel instead shifted masks by up to ~1 working
    pixel towards the right and bottom of odd-sized frames). A direct INTER_AREA resize by a
    non-integer factor costs ~6 ms on a 1280x960 frame; this ~1 ms.

    ``halvings``: a list kept by the caller for this one image: the halvings already made are taken from
    it and new ones added (the scale search and the segmentation of a field halve the same frame).
    """
    h, w = image.shape[:2]
    out_w, out_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    img = image
    factor = level = 1
    while img.shape[1] >= 2 * out_w and img.shape[0] >= 2 * out_h:
        if halvings is not None and len(halvings) >= level:
            img = halvings[level - 1]
        else:
            hh, ww = img.shape[:2]
            if hh % 2 or ww % 2:
                img = cv2.copyMakeBorder(img, 0, hh % 2, 0, ww % 2, cv2.BORDER_REPLICATE)
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
            if halvings is not None:
                halvings.append(img)
        factor *= 2
        level += 1
    # the halved image covers img.shape * factor input pixels (the padding included) from the origin
    covered_w, covered_h = img.shape[1] * factor, img.shape[0] * factor
    if (img.shape[1], img.shape[0]) != (out_w, out_h):
        # keep the covered/output ratio exact: the output spans the same input extent
        img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR_EXACT)
    return img, (img.shape[1] / covered_w, img.shape[0] / covered_h)


def lit_mask(image: np.ndarray, cell_px: float, min_frac: float) -> np.ndarray | None:
    """Where the field of view is lit (uint8, 255) at the resolution of ``image``, or None when all of it is.

    Unlit is what stays dark in every channel, averaged over a square a cell wide, against the field's
    plasma (its 99th percentile), and reaches the image border: a field stop's surround always does, while
    the darkest clumps of stained cells inside a field keep some light in one channel (BBBC041's blue
    clusters: >= 0.29 of the plasma, IML >= 0.51; the brightest channel, averaged so).
    """
    k = max(3, _odd(cell_px))
    r, g, b = cv2.split(image)
    light = cv2.blur(cv2.max(cv2.max(r, g), b), (k, k))  # numpy's max over the channel axis: 10x slower
    lo, hi = cv2.minMaxLoc(light)[:2]
    if lo >= min_frac * hi:  # the plasma is no brighter than the brightest: nothing is dark against it
        return None
    plasma = quantile(light[::2, ::2].ravel(), 0.99)
    dark = (light < min_frac * plasma).astype(np.uint8)
    if not dark.any():
        return None
    n, labels = cv2.connectedComponents(dark, connectivity=8)
    border = np.unique(np.concatenate([labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]]))
    border = border[border > 0]
    if not border.size:
        return None
    # the average over the square reaches half a square past the black: widen the dark by as much, so the
    # black rim beside the lit disc is not taken for a ring of the darkest cells
    dark = cv2.dilate(np.isin(labels, border).astype(np.uint8), _ellipse(k))
    return np.where(dark > 0, 0, 255).astype(np.uint8)


def _blank_unlit(image: np.ndarray, score: np.ndarray, cell_px: float, min_frac: float) -> np.ndarray | None:
    """Zero the darkening ``score`` where no light falls (nothing to see there, not the darkest of cells), in
    place; returns :func:`lit_mask`."""
    lit = lit_mask(image, cell_px, min_frac)
    if lit is not None:
        score[lit == 0] = 0
    return lit


def _darkening(image: np.ndarray, window_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel transmission ``I/background`` (uint8, 255 = plasma) and the darkening score (uint8).

    The background is a grey-level closing wider than a cell, done on a 4x smaller copy and blurred, so
    uneven illumination divides out.
    """
    h, w = image.shape[:2]
    f = 4
    small = cv2.resize(image, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    # Nothing in a smear is brighter than its plasma: a brighter thing (white text or a scale bar burned
    # in by the camera) is taken down to a little over the plasma's level, or the closing spreads it as
    # light over a cell's width around it and the plasma there reads as dark (two cells and the text merged
    # into one). On 10 IML and 8 BBBC041 fields, a white overlay made 28 detections on it, now 17, and lost
    # 23 cells beside it, now 17; evaluate-fields reads the same on both sets as without the cap. A cap at the
    # plasma's level itself (no margin) cut the plasma's own spread and moved 1 parasite cell in 13 on BBBC041.
    plasma = [min(255, int(quantile(small[..., c], PLASMA_QUANTILE)) + PLASMA_MARGIN) for c in range(3)]
    small = np.minimum(small, np.array(plasma, np.uint8))
    k = _ellipse(max(3.0, window_px / f))
    bright = cv2.blur(cv2.dilate(small, k), (k.shape[1], k.shape[0]))
    background = cv2.resize(bright, (w, h), interpolation=cv2.INTER_LINEAR_EXACT)
    # Integer lookups, not cv2.divide and cv2.transform: their float kernels round a pixel here and
    # there one way on x86-64 and the other on the Pi's ARM cores, which moved cell outlines and scores.
    quotient, score_of_sum = _darkening_luts()
    index = image.astype(np.uint16)  # pixel * 256 + background: not cv2.multiply, whose scalar before
    index <<= 8  # OpenCV 4.9 scaled the first channel only
    index |= background
    transmission = np.take(quotient, index)
    r, g, b = cv2.split(transmission)
    score = np.take(score_of_sum, cv2.add(cv2.add(r, g, dtype=cv2.CV_16U), b, dtype=cv2.CV_16U))
    return transmission, score


@functools.cache
def _darkening_luts() -> tuple[np.ndarray, np.ndarray]:
    """Exact integer tables for :func:`_darkening`, rounding halves to even as OpenCV does on x86-64.

    ``quotient[i * 256 + b]`` is the transmission ``255 * i / max(b, 1)``, rounded and capped at 255;
    ``score_of_sum[s]`` is the darkening score ``(3 - s / 255) * _SCORE_SCALE = (765 - s) / 2`` of a pixel
    whose three transmissions sum to ``s``, rounded and capped at 255.
    """
    i = np.arange(256, dtype=np.int64)[:, None]
    b = np.maximum(np.arange(256, dtype=np.int64)[None, :], 1)
    q, r = np.divmod(255 * i, b)
    quotient = np.minimum(q + ((2 * r > b) | ((2 * r == b) & (q % 2 == 1))), 255).astype(np.uint8).ravel()
    half, odd = np.divmod(765 - np.arange(766), 2)
    score_of_sum = np.minimum(half + ((odd == 1) & (half % 2 == 1)), 255).astype(np.uint8)
    quotient.flags.writeable = score_of_sum.flags.writeable = False  # shared by every call
    return quotient, score_of_sum


def _fill_holes(fg: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background pockets enclosed by foreground and at most ``max_area_px`` large."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cv2.bitwise_not(fg), connectivity=4)
    if n <= 1:
        return fg
    h, w = fg.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    fill = ~((x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)) & (area <= max_area_px)
    fill[0] = False  # label 0 is the foreground itself
    if not fill.any():
        return fg
    out = fg.copy()
    out[fill[lab]] = 255
    return out


def _edges(score: np.ndarray, min_edge_frac: float) -> tuple[np.ndarray, ...]:
    """Strong edge pixels: ``(xs, ys, ux, uy, weight)``, unit gradients pointing into the dark cells.

    ``weight`` is the edge strength relative to the field's strong edges (99th percentile), capped at 1.
    """
    sm = cv2.GaussianBlur(score, (0, 0), 1.0).astype(np.float32)
    gx = cv2.Sobel(sm, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(sm, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    strong = quantile(mag[::3, ::3].ravel(), 0.99)
    if strong <= 0:
        empty = np.zeros(0, np.float32)
        return empty, empty, empty, empty, empty
    ys, xs = np.nonzero(mag > min_edge_frac * strong)
    m = mag[ys, xs]
    return (
        xs.astype(np.float32),
        ys.astype(np.float32),
        gx[ys, xs] / m,
        gy[ys, xs] / m,
        np.minimum(m / strong, 1.0),
    )


def _vote(
    edges: tuple[np.ndarray, ...], radius: float, shape: tuple[int, int], cell: int = 1, weighted: bool = False
) -> np.ndarray:
    """Accumulate each edge's vote at ``radius`` along its gradient, on a grid of ``cell``-px squares."""
    xs, ys, ux, uy, weight = edges
    h, w = (shape[0] + cell - 1) // cell, (shape[1] + cell - 1) // cell
    cx = np.floor((xs + radius * ux) / cell).astype(np.int32)
    cy = np.floor((ys + radius * uy) / cell).astype(np.int32)
    ok = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    votes = np.bincount(cy[ok] * w + cx[ok], weights=weight[ok] if weighted else None, minlength=h * w)
    return votes.astype(np.float32).reshape(h, w)


def estimate_cell_diameter(
    image_rgb: np.ndarray,
    params: SegmentParams = SegmentParams(),  # noqa: B008
    *,
    halvings: list[np.ndarray] | None = None,
) -> float | None:
    """Typical red-cell diameter in full-resolution px, or None for a blank field or an estimate at the
    top of the searched range (a blurred field reads as huge cells there: not to be trusted)."""
    d = _estimate_diameter(image_rgb, params, halvings)
    if d is None or d >= largest_trusted_diameter(max(image_rgb.shape[:2]), params):
        return None
    return d


def largest_trusted_diameter(long_side_px: int, params: SegmentParams = SegmentParams()) -> float:  # noqa: B008
    """The cell diameter from which :func:`estimate_cell_diameter` gives up: 0.95 of the top of its range."""
    return 0.95 * params.max_diameter_frac_of_long_side * long_side_px


def _estimate_diameter(
    image_rgb: np.ndarray, params: SegmentParams, halvings: list[np.ndarray] | None = None
) -> float | None:
    """Typical cell diameter in full-resolution px by a radial-symmetry scale search; None if blank."""
    long_side = max(image_rgb.shape[:2])
    s0 = min(1.0, params.probe_long_side_px / long_side)
    probe, (s0x, s0y) = _shrink(image_rgb, s0, halvings)
    s0 = 0.5 * (s0x + s0y)
    p_long = max(probe.shape[:2])
    _, score = _darkening(probe, 0.25 * p_long)  # window: wider than the largest cell searched
    # the cell size is not known yet: light averaged over a middling one (a small square sees into dark cells)
    middling = math.sqrt(params.min_diameter_frac_of_long_side * params.max_diameter_frac_of_long_side) * p_long
    _blank_unlit(probe, score, middling, params.min_light_frac_of_plasma)
    if int(score.max()) < params.min_darkening_sum * _SCORE_SCALE:
        return None
    edges = _edges(score, params.vote_min_edge_frac)
    if edges[0].size < 50:
        return None
    radii = np.geomspace(
        0.5 * params.min_diameter_frac_of_long_side * p_long,
        0.5 * params.max_diameter_frac_of_long_side * p_long,
        params.scale_search_steps,
    )
    concentration = np.zeros(len(radii))
    for i, r in enumerate(radii):
        # Votes blurred at sigma = 0.15 R minus their 3x wider blur: only tight piles count. The grid
        # coarsens with R so that sigma stays ~1 grid cell (cheap). 4*pi*sigma^2 / total^2 makes one
        # pile score the same at every R, so the radius with the most concentrated votes wins.
        sigma = 0.15 * r
        cell = max(1, int(round(sigma)))
        sig = sigma / cell
        acc = _vote(edges, r, probe.shape[:2], cell)
        total = float(acc.sum())
        if total <= 0:
            continue
        dog = cv2.GaussianBlur(acc, (0, 0), sig) - cv2.GaussianBlur(acc, (0, 0), 3 * sig)
        concentration[i] = 4 * math.pi * sig**2 * float((dog * dog).sum()) / total**2
    i = int(np.argmax(concentration))
    log_r = math.log(radii[i])
    if 0 < i < len(radii) - 1:
        a, b, c = concentration[i - 1 : i + 2]
        den = a - 2 * b + c
        if den < 0:  # vertex of the parabola through the three points, in log-radius
            log_r += 0.5 * (a - c) / den * (math.log(radii[1]) - math.log(radii[0]))
    return 2.0 * math.exp(log_r) / s0


def _markers(
    score: np.ndarray, fg: np.ndarray, dt: np.ndarray, params: SegmentParams, diameter_px: float
) -> np.ndarray:
    """Marker labels (int32, 0 = none): peaks of edge-strength-weighted radial votes + distance."""
    inside = fg > 0
    if not inside.any():
        return np.zeros(fg.shape, np.int32)
    edges = _edges(score, params.vote_min_edge_frac)
    r = 0.5 * diameter_px
    acc = np.zeros(fg.shape, np.float32)
    for f in params.vote_radius_fracs:
        acc += _vote(edges, f * r, fg.shape, weighted=True)
    acc = cv2.GaussianBlur(acc, (0, 0), max(1.0, 0.08 * diameter_px))
    ref = quantile(acc[::2, ::2][inside[::2, ::2]], 0.99) or 1.0
    strength = acc / ref + params.marker_distance_weight * dt / r
    sep = params.marker_min_separation_frac_of_diameter * diameter_px
    # Candidates: local maxima in a (cheap, separable) square window of side ~sep, strong enough.
    k = _odd(sep)
    cand = (strength >= cv2.dilate(strength, np.ones((k, k), np.uint8))) & inside
    cand &= strength > params.marker_min_strength_frac
    ys, xs = np.nonzero(cand)
    if ys.size == 0:
        return np.zeros(fg.shape, np.int32)
    # A candidate survives unless a stronger one lies within the separation radius. Candidates are a
    # few hundred, so the pairwise distances are cheap; ties (plateaus) keep the first in raster order.
    s = strength[ys, xs]
    order = np.argsort(-s, kind="stable")
    ys, xs, s = ys[order], xs[order], s[order]
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    markers = np.zeros(fg.shape, np.int32)
    survivors = _suppress(pts, sep)
    markers[ys[survivors], xs[survivors]] = np.arange(1, survivors.size + 1, dtype=np.int32)
    return markers


def _suppress(pts: np.ndarray, radius: float, block: int = 512) -> np.ndarray:
    """Indices of points (sorted strongest first) with no earlier point within ``radius``."""
    n = len(pts)
    suppressed = np.zeros(n, dtype=bool)
    r2 = radius * radius
    for start in range(0, n, block):
        chunk = pts[start : start + block]
        d2 = ((chunk[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2)
        idx = np.arange(start, start + len(chunk))
        earlier = np.arange(n)[None, :] < idx[:, None]
        suppressed[idx] = (earlier & (d2 < r2)).any(axis=1)
    return np.flatnonzero(~suppressed)


def _split(fg: np.ndarray, markers: np.ndarray, params: SegmentParams, diameter_px: float) -> np.ndarray:
    """Give every foreground pixel to its nearest marker, merge over-split pieces, cut 1-px lines.

    Returns int32 labels: 0 = background or cut line, >0 = a cell piece.
    """
    if not markers.any():
        return np.zeros(fg.shape, np.int32)
    src = np.where(markers > 0, 0, 255).astype(np.uint8)
    _, nearest = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    lab = nearest.astype(np.int32)
    lab[fg == 0] = 0
    if params.merge_max_area_frac_of_typical > 0:
        lab = _merge(lab, params, diameter_px)
    cut = np.zeros(fg.shape, dtype=bool)
    cut[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    cut[1:, :] |= lab[1:, :] != lab[:-1, :]
    lab[cut] = 0
    return lab


def _merge(lab: np.ndarray, params: SegmentParams, diameter_px: float) -> np.ndarray:
    """Merge neighbouring pieces whose shared border is long for their size and whose union is a cell."""
    n = int(lab.max()) + 1
    a_h, b_h = lab[:, :-1], lab[:, 1:]
    a_v, b_v = lab[:-1, :], lab[1:, :]
    sel_h = (a_h != b_h) & (a_h > 0) & (b_h > 0)
    sel_v = (a_v != b_v) & (a_v > 0) & (b_v > 0)
    a = np.concatenate([a_h[sel_h], a_v[sel_v]]).astype(np.int64)
    b = np.concatenate([b_h[sel_h], b_v[sel_v]]).astype(np.int64)
    if a.size == 0:
        return lab
    pairs, border_px = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_counts=True)
    area = np.bincount(lab.ravel(), minlength=n).astype(np.float64)
    nominal = math.pi * diameter_px**2 / 4.0
    sized = area[1:][(area[1:] >= 0.4 * nominal) & (area[1:] <= 2.0 * nominal)]
    typical = float(np.median(sized)) if sized.size >= 3 else nominal
    max_area = params.merge_max_area_frac_of_typical * typical
    # A border counted on 4-neighbour steps runs ~1.2x its Euclidean length (mean over directions).
    border_len = border_px / 1.2
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    merged = False
    for idx in np.argsort(-border_len, kind="stable"):
        i, j = find(int(pairs[idx] // n)), find(int(pairs[idx] % n))
        if i == j or area[i] + area[j] > max_area:
            continue
        smaller_width = 2.0 * math.sqrt(min(area[i], area[j]) / math.pi)
        if border_len[idx] < params.merge_min_border_frac_of_width * smaller_width:
            continue
        parent[j] = i
        area[i] += area[j]
        merged = True
    if not merged:
        return lab
    roots = np.array([find(i) for i in range(n)], dtype=np.int32)
    return roots[lab]


def _nucleus_mask(
    transmission: np.ndarray, fg: np.ndarray, params: SegmentParams, diameter_px: float
) -> np.ndarray:
    """Solid blobs much darker in green and more purple than the field's red cells (white-cell nuclei)."""
    inside = fg > 0
    t_r = transmission[:, :, 0].astype(np.int16)
    t_g = transmission[:, :, 1].astype(np.int16)
    cell_g = quantile(transmission[::2, ::2, 1][inside[::2, ::2]], 0.5)  # uint8: the histogram quantile
    purple = (t_g < params.nucleus_max_green_transmission_frac_of_cells * cell_g) & (
        (t_r - t_g) > params.nucleus_min_purple_excess
    )
    opened = cv2.morphologyEx(
        purple.astype(np.uint8), cv2.MORPH_OPEN, _ellipse(params.nucleus_open_frac_of_diameter * diameter_px)
    )
    return opened


def _filter(
    pieces: np.ndarray, transmission: np.ndarray, fg: np.ndarray, params: SegmentParams, d_work: float,
    lit: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Decide which pieces are red cells: (keep flags, piece labels, piece stats, typical area px)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((pieces > 0).astype(np.uint8), connectivity=4)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    keep = np.ones(n, dtype=bool)
    keep[0] = False
    nominal_area = math.pi * d_work**2 / 4.0
    # The typical area is the median of cell-sized pieces, so debris and clumps do not pull it.
    sized = keep & (area >= 0.4 * nominal_area) & (area <= 2.0 * nominal_area)
    typical_area = float(np.median(area[sized])) if sized.sum() >= 3 else nominal_area
    keep &= area >= params.min_area_frac_of_typical * typical_area
    keep &= area <= params.max_area_frac_of_typical * typical_area
    keep &= np.maximum(bw, bh) <= params.max_aspect_ratio * np.maximum(np.minimum(bw, bh), 1)
    if params.drop_border_cells:
        edge = np.concatenate([labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]])
        contact_px = np.bincount(edge, minlength=n)
        if lit is not None:  # the edge of the lit field of view cuts cells as the image border does
            rim = cv2.dilate(cv2.bitwise_not(lit), np.ones((3, 3), np.uint8)) & lit
            contact_px += np.bincount(labels[rim > 0], minlength=n)
        # A cut cell split in two: each fragment grazes the border less than the limit, the cell more (a
        # cell 56% in view was kept as two cells). Fragments (touching the border, smaller than a cell) of
        # one cut cell are weighed together.
        frag = keep & (contact_px > 0) & (area < FRAGMENT_AREA_FRAC * typical_area)
        if np.count_nonzero(frag) >= 2:
            # fragments that touch one another (across the 1 px cut between them), not every fragment of a
            # clump: a small whole cell grazing the border at the far end of a chain of touching cells
            # was dropped for the cut cell at the other end
            inside = frag[labels]  # the fragments' pixels
            _, clump = cv2.connectedComponents(cv2.dilate(inside.view(np.uint8), np.ones((3, 3), np.uint8)),
                                               connectivity=8)
            clump_of = np.zeros(n, np.int64)
            clump_of[labels[inside]] = clump[inside]
            together = np.bincount(clump_of[frag], weights=contact_px[frag], minlength=int(clump_of.max()) + 1)
            contact_px = np.where(frag, together[clump_of], contact_px)
        keep &= contact_px <= params.max_border_contact_frac_of_diameter * d_work
    if keep.any():
        nucleus = _nucleus_mask(transmission, fg, params, d_work)
        if nucleus.any():
            # Lobes of one nucleus lie within a fraction of a cell of each other: group, then weigh.
            _, groups = cv2.connectedComponents(cv2.dilate(nucleus, _ellipse(0.3 * d_work)), connectivity=8)
            group_px = np.bincount(groups[nucleus > 0], minlength=int(groups.max()) + 1)
            white = group_px >= params.nucleus_min_area_frac_of_typical * typical_area
            white[0] = False
            in_white = (nucleus > 0) & white[groups]
            keep &= np.bincount(labels[in_white], minlength=n) < 0.1 * typical_area
    return keep, labels, stats, typical_area


def _map_back(
    labels: np.ndarray,
    fg: np.ndarray,
    stats: np.ndarray,
    keep: np.ndarray,
    scale_xy: tuple[float, float],
    full_shape: tuple[int, int],
) -> list[Cell]:
    """Full-resolution boxes and masks of the kept pieces (masks upsampled bilinearly, then cut at 1/2)."""
    full_h, full_w = full_shape
    sx, sy = scale_xy
    h, w = labels.shape
    # The 1-px cut lines between touching cells go back to both neighbours: each cell grows by one
    # pixel into the cut-line pixels next to it (a dilation of the whole label image would give every
    # cut pixel to the higher label only, leaving one mask short of the contact and the other past it).
    # 0/255 masks made by OpenCV throughout: a few numpy temporaries fewer per cell
    cut_line = cv2.bitwise_and(cv2.compare(labels, 0, cv2.CMP_EQ), cv2.compare(fg, 0, cv2.CMP_GT))
    grow = np.ones((3, 3), np.uint8)
    cells: list[Cell] = []
    for k in np.flatnonzero(keep).tolist():
        x, y, bw, bh = stats[k, :4].tolist()
        x0, y0, x1, y1 = max(0, x - 1), max(0, y - 1), min(w, x + bw + 1), min(h, y + bh + 1)
        own = cv2.compare(labels[y0:y1, x0:x1], k, cv2.CMP_EQ)
        sub = cv2.bitwise_or(own, cv2.bitwise_and(cv2.dilate(own, grow), cut_line[y0:y1, x0:x1]))
        fx0, fy0 = int(x0 / sx), int(y0 / sy)
        fx1, fy1 = int(math.ceil(x1 / sx)), int(math.ceil(y1 / sy))
        big = cv2.resize(sub, (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_LINEAR_EXACT)
        # the working image may reach past the frame (its odd sides were padded): cut what lies outside
        big = big[: full_h - fy0, : full_w - fx0]
        _, big = cv2.threshold(big, 127, 255, cv2.THRESH_BINARY)
        tx, ty, tw, th = cv2.boundingRect(big)
        if tw == 0 or th == 0:
            continue
        mask = big[ty : ty + th, tx : tx + tw] > 0
        cells.append(Cell(bbox=(fx0 + tx, fy0 + ty, tw, th), mask=mask, area_px=int(cv2.countNonZero(big))))
    return cells
