"""Field analysis as a pure function: frame -> cells -> verdicts -> counts.

``analyze_field`` takes an RGB frame, a classifier and settings, and returns a :class:`FieldResult`.
It keeps no state and does no I/O; the service, the CLI and the store sit around it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from device.preprocess import (
    BACKGROUND_GAIN_RANGE,
    background_gains,
    field_crops,
    needed_background_gains,
    prepare_batch,
)

FOCUS_WIDTH_PX = 640  # the exposure checks (and focus, when the cell size is unknown) work at this width
FOCUS_CELL_PX = 36.0  # focus is measured with the field resized so a red cell is this wide
FOCUS_REFIT_S = 5.0  # the live focus meter re-estimates the cell size this often
_RIM_PX = 10  # focus_measure leaves out this much (at its scale) inside the rim of a round field of view
_FOCUS_MIN_PX = 500  # fewer lit pixels than this (at focus_measure's scale): the whole frame is measured
_BLACK_OF_LIGHT = 0.15  # and the surround's black: gray under this share of the field's light


class Classifier(Protocol):
    threshold: float
    input_size_px: int

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class AnalysisSettings:
    """What decides a field is usable. Defaults measured on the BBBC041 and IML fields."""

    # focus_measure's sharpness ratio. The 64 IML (scale bar painted out) and BBBC041 fields measure
    # 2.49-4.22 (the same at 60% light, 2.62-4.91 at 2x zoom, 2.51-4.38 with sensor noise sd 5); blurred
    # by 0.04 of a cell diameter (~3.7 px at 1600 px wide) 58 of 64 fall below 2.4, by 0.06 63 of 64.
    min_focus: float = 2.4
    min_cells_per_field: int = 10
    max_overexposed_frac: float = 0.5  # share of pixels at >= 250 in all channels
    min_mean_brightness: float = 40.0  # 0-255 gray; below: lamp off or shutter closed
    min_foreground_frac: float = 0.05  # share of the field covered by cells
    # Cells narrower than this lose the parasites' detail: on the BBBC041 + IML held-out fields scaled
    # down, parasite cells found fell from 6-8 of 22 (cells >= 33 px) to 2-4 (14-41 px; the model before
    # the one shipped on 2026-12-01).
    min_cell_diameter_px: float = 32.0
    # Pixel noise at the classifier's scale (gray levels, a cell resized to the model input, after the
    # background gains). The 64 IML and BBBC041 fields measure 0.09-0.87; added sensor noise of sd 5 /
    # 8 / 10 gives 1.25-1.68 / 1.71-2.60 / 2.01-3.19, a lamp at 55% with sd 6 2.25-3.38; sd 10 doubled
    # the cells flagged infected with no field rejected (the model before the one shipped on 2026-12-01).
    max_noise: float = 2.0
    # Median outline size of the kept cells / the cell size the search found. The 66 IML, BBBC041 and
    # fixture fields measure 0.86-1.01; fields segmented at a wrong size (a mosaic crop, a stretched frame,
    # a thick area) 0.57-0.65 and counted anyway.
    min_outline_match: float = 0.75
    threshold: float | None = None  # None: the classifier's (model card) threshold


@dataclass(frozen=True)
class CellVerdict:
    bbox: tuple[int, int, int, int]
    p_infected: float
    infected: bool

    def to_json(self) -> dict:
        # the score whole: rounded to 4 decimals, a cell at the threshold's own score (0.9660099) read 0.966,
        # below the threshold, beside "infected": true
        return {"bbox": [int(v) for v in self.bbox], "p_infected": float(self.p_infected),
                "infected": bool(self.infected)}


@dataclass
class FieldResult:
    width: int
    height: int
    rejected: str | None
    cells: list[CellVerdict]
    focus: float
    threshold: float
    timing_ms: dict[str, float] = field(default_factory=dict)
    masks: list[np.ndarray] = field(default_factory=list, repr=False)  # box-sized, for crops/annotation

    @property
    def rbc_count(self) -> int:
        return 0 if self.rejected else len(self.cells)

    @property
    def infected_count(self) -> int:
        return 0 if self.rejected else sum(c.infected for c in self.cells)

    def to_json(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "rejected": self.rejected,
            # unrounded: a field rejected at 2.44 against a limit of 2.45 read "2.4", the limit itself
            "focus": float(self.focus),
            "threshold": self.threshold,
            "cells": [c.to_json() for c in self.cells],
            "rbc_count": self.rbc_count,
            "infected_count": self.infected_count,
            "timing_ms": {k: round(v, 2) for k, v in self.timing_ms.items()},
        }


# A stained field has colour somewhere: the 99th percentile of max-min over R, G, B (on every 4th pixel of
# the 640 px copy), scaled by 240 / the light (the 90th percentile of gray where it falls, taken as at least 60)
# as the colours dim with the lamp, was >= 35 on all 68 sample, IML and BBBC041 fields, at full light and
# at lamp 25% alike; a gray picture gives 0 (a gray JPEG 0-1). Unscaled, lamp 25% read 8-31, and 12 of the
# 68 fields were told "a grayscale picture: check the camera's colour format" instead of the lamp.
MIN_STAIN_CHROMA = 10
_CHROMA_LIGHT_FLOOR = 60.0

# "Too few cells" names the magnification when the frame, less a cell at each edge, has room for fewer than
# this many cells (packed square): the 4 BBBC041 samples at 2x zoom (cells 200-240 px
# in 1600 x 1200) have room for 23-35, and one kept 8 cells whole; the 4 samples and 60 IML fields as taken
# have room for 118-258.
FEW_FIT_WHOLE = 40
# ...unless the picture is a strip (a long side this many times its short one; cameras give 4:3 to 16:9): then
# the picture is too narrow, not the magnification too high
NARROW_ASPECT = 3.0

# A channel at its top over more of the field than the background measure's 5%
# (``preprocess.background_rgb``: the 95th percentile) leaves the background's colour unknown, and the
# crops' gains wrong: a red gain of 1.2 at the camera clipped 41-72% of the BBBC041 fields' red and doubled
# their flagged cells. The 68 real fields: at most 0.03% of pixels at >= 254 in any channel (the IML scale bar).
CHANNEL_TOP = 254
CHANNEL_NAMES = ("red", "green", "blue")  # the frames' channel order (RGB), as the messages name them
MAX_CHANNEL_CLIPPED_FRAC = 0.05
# A channel crushed to black (<= 2) over more than 2.5% of the field: a camera's saturation or contrast set
# too high. The white-cell rule reads the cells' green light against the field's: saturation x1.3 put green
# at 0 on up to 24% of an IML field, and the rule then dropped up to 31% of its red cells, unsaid (helper
# measurement). The 68 real fields: at most 0.04% of pixels; at lamp 30% 0.5%, gamma 1.5 at most 1.6%.
CHANNEL_BOTTOM = 2
MAX_CHANNEL_BLACK_FRAC = 0.025

# Something in view: detail against the field's smooth light, in gray levels of a field lit to 240. The 99th
# percentile of |image - its blur at sigma 32 px| on the gray 640 px copy (computed at a quarter of that size,
# whose area average keeps sensor noise out), where the light falls, away from the edge of a round field of
# view, scaled by 240 / the light (the 90th percentile there): a dimmer lamp lowers every difference with it,
# and a gate in absolute levels rejected a real field under a lamp at 42%. The 99th percentile, not a higher
# one: a few specks of dust on bare glass are not a smear. Measured (tests/benchmarks/measure_blank_gate.py):
# 43.6-136.9 on the 68 sample, IML and BBBC041 fields, >= 43.7 with the lamp at 42%, >= 27.2 on
# copies blurred at sigma 16 px (far past "out of focus"), dimmed too; on blank fields (bare glass, plasma
# pink or blue, 0-40% vignetting, lamp at 35-100%, sensor noise of sd 0-20, JPEG quality 70) <= 12.1, and
# 17.3 with both the dimmest lamp and the worst noise; bare glass with 3-30 specks of dust 4.6-4.9.
MIN_LOCAL_CONTRAST = 20.0
_CONTRAST_BACKGROUND_PX = 32.0


def measured_beside_limit(value: float, limit: float, places: int = 2) -> tuple[str, str]:
    """A measurement and the limit it failed, as a message gives them: with the decimals that tell them
    apart ("sharpness 2.3996 < 2.4000", where two decimals read "2.40 < 2.40")."""
    while places < 6 and f"{value:.{places}f}" == f"{limit:.{places}f}":
        places += 1
    return f"{value:.{places}f}", f"{limit:.{places}f}"


def _small(image_rgb: np.ndarray) -> np.ndarray:
    h, w = image_rgb.shape[:2]
    if w <= FOCUS_WIDTH_PX:
        return image_rgb
    return cv2.resize(image_rgb, (FOCUS_WIDTH_PX, max(1, round(h * FOCUS_WIDTH_PX / w))), interpolation=cv2.INTER_AREA)


def local_contrast(gray: np.ndarray, seen: np.ndarray | None = None) -> float | None:
    """Detail against the smooth light of a gray field copy (see ``MIN_LOCAL_CONTRAST``); None when too little
    of it is lit to judge (``seen``: the lit pixels, None for all)."""
    from device.segment import _odd

    # on a quarter-size copy: the area average smooths sensor noise, and the wide blur costs ~16x less
    h, w = gray.shape[:2]
    q = cv2.resize(gray, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA).astype(np.float32)
    sigma = _CONTRAST_BACKGROUND_PX / 4
    diff = cv2.absdiff(q, cv2.GaussianBlur(q, (0, 0), sigma))
    if seen is not None:
        # the blur mixes the dark surround into the lit pixels near the rim: judge only those well inside
        s = cv2.resize(seen.astype(np.uint8), (q.shape[1], q.shape[0]), interpolation=cv2.INTER_NEAREST)
        k = _odd(4 * sigma)
        inner = cv2.erode(s, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
        if inner.sum() < 0.05 * inner.size:
            return None
        diff, lit = diff[inner], q[inner]
    else:
        lit = q
    light = max(1.0, float(np.percentile(lit, 90)))
    return float(np.percentile(diff, 99)) * 240.0 / light


FIND_LIT = "find"  # focus_measure's lit= default: find the lit field of view itself


def _lit_small(small: np.ndarray, cell_diameter_px: float | None, width_px: int) -> np.ndarray | None:
    """The lit field of view (``segment.lit_mask``) on the 640 px copy ``small`` of a ``width_px`` wide field."""
    from device.segment import SegmentParams, lit_mask

    scale = small.shape[1] / width_px
    cell_px = cell_diameter_px * scale if cell_diameter_px else 0.02 * max(small.shape[:2])
    return lit_mask(small, cell_px, SegmentParams().min_light_frac_of_plasma)


def focus_measure(
    image_rgb: np.ndarray, cell_diameter_px: float | None = None, *, estimate: bool = True,
    small: np.ndarray | None = None, small_gray: np.ndarray | None = None, lit: np.ndarray | str | None = FIND_LIT,
) -> float:
    """Sharpness: how much finer detail the field has than a slightly smoothed copy of itself.

    The gray field is resized so a cell is at most :data:`FOCUS_CELL_PX` wide (cells twice as large read
    the same; without a cell size, 640 px wide), and the variance of the Laplacian after a 1 px Gaussian
    is divided by that after a 2 px one. A ratio does not change when the picture is multiplied by a
    constant (a dimmer lamp) and hardly with the stain's contrast or how many cells there are; the 1 px
    smoothing keeps sensor noise from reading as sharpness. About 1 means no fine detail.

    Only the lit field of view counts, away from its rim: the sharp edge of a round field stop (an
    eyepiece adapter's) is detail at any focus, and read a field blurred far past usable (sigma 0.06 of a
    cell) as 3.6-5.5, sharper than any sharp field.

    Args:
        cell_diameter_px: the field's cell size, or None: estimated when ``estimate`` is true.
        small: the field's 640 px wide copy (``_small``) when the caller has it already.
        lit: the lit field of view (``segment.lit_mask``, any size: 255 lit) or None for all of it;
            by default found on the 640 px copy.
    """
    from device.segment import estimate_cell_diameter

    if cell_diameter_px is None and estimate:
        cell_diameter_px = estimate_cell_diameter(image_rgb)
    h, w = image_rgb.shape[:2]
    scale = min(1.0, FOCUS_CELL_PX / cell_diameter_px) if cell_diameter_px else min(1.0, FOCUS_WIDTH_PX / w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    # From the 640 px copy when the target is smaller: an area resize of a large frame costs ~5 ms.
    src = image_rgb
    if size[0] <= min(w, FOCUS_WIDTH_PX):
        src = _small(image_rgb) if small is None else small
    gray = small_gray if src is small and small_gray is not None else cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)
    if gray.shape[1] != size[0]:
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    gray = gray.astype(np.float32)
    fine = cv2.Laplacian(cv2.GaussianBlur(gray, (0, 0), 1.0), cv2.CV_32F)
    coarse = cv2.Laplacian(cv2.GaussianBlur(gray, (0, 0), 2.0), cv2.CV_32F)
    if isinstance(lit, str):
        lit = _lit_small(_small(image_rgb) if small is None else small, cell_diameter_px, w)
    if lit is not None:
        inner = cv2.resize(lit, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_NEAREST)
        # lit_mask's average over a square a cell wide keeps as lit the black slivers where the disc meets
        # the frame's edge: the black itself is left out too (the darkest stained pixels are far brighter)
        inner[gray < _BLACK_OF_LIGHT * float(np.percentile(gray, 99))] = 0
        # the 2 px blur and the Laplacian reach 9 px: the rim's edge stays outside what is measured
        inner = cv2.erode(inner, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _RIM_PX + 1, 2 * _RIM_PX + 1)))
        keep = inner > 0
        # a small lit disc is still judged on its own pixels: the whole frame would count the rim again
        if keep.sum() >= _FOCUS_MIN_PX:
            fine, coarse = fine[keep], coarse[keep]
    return float(fine.var() / max(float(coarse.var()), 1e-6))


class FocusMeter:
    """The live focus figure: :func:`focus_measure` with the cell size re-estimated every few seconds."""

    def __init__(self, refit_s: float = FOCUS_REFIT_S):
        self.refit_s = refit_s
        self._diameter: float | None = None
        self._lit: np.ndarray | None = None
        self._t = float("-inf")

    def __call__(self, image_rgb: np.ndarray) -> float:
        from device.segment import estimate_cell_diameter

        now = time.monotonic()
        if now - self._t >= self.refit_s:
            self._diameter, self._t = estimate_cell_diameter(image_rgb), now
            # the field stop does not move either
            self._lit = _lit_small(_small(image_rgb), self._diameter, image_rgb.shape[1])
        return focus_measure(image_rgb, self._diameter, estimate=False, lit=self._lit)


_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_at_cell_scale(image_rgb: np.ndarray, cell_diameter_px: float, cell_input_px: int) -> float:
    """Pixel noise (sd, gray levels) of the field resized so a cell spans the classifier's input.

    Immerkaer's Laplacian-difference estimate, with the median of its magnitude so that cell edges do
    not count as noise: for Gaussian noise of sd s the filter gives sd 6 s, whose median |x| is 0.6745 of it.
    The resize is what the crops go through, so the figure is the noise the classifier sees.
    """
    h, w = image_rgb.shape[:2]
    if min(h, w) >= 8 * cell_diameter_px:  # the central half each way: noise is the same across a field
        image_rgb = image_rgb[h // 4 : h - h // 4, w // 4 : w - w // 4]
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    s = min(1.0, float(cell_input_px) / max(float(cell_diameter_px), 1.0))
    if s < 1.0:
        h, w = gray.shape
        gray = cv2.resize(gray, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    from device.segment import quantile

    r = np.abs(cv2.filter2D(gray, cv2.CV_32F, _NOISE_KERNEL)[1:-1:2, 1:-1:2]).ravel()  # every 2nd: plenty
    return quantile(r, 0.5) / (0.6745 * 6.0)


def image_quality(
    image_rgb: np.ndarray, settings: AnalysisSettings, cell_diameter_px: float | None = None,
    small: np.ndarray | None = None,
) -> tuple[float, str | None]:
    """Exposure (on a 640 px wide copy), colour and focus checks that need no segmentation.

    ``small``: the field's 640 px wide copy (``_small``) when the caller has it already.
    Returns (focus, reason or None).
    """
    small = _small(image_rgb) if small is None else small
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    # Exposure and focus are judged where the light falls: a round field of view in a black surround is no
    # darker (and no less saturated) for the black around it, nor sharper for its edge.
    lit = _lit_small(small, cell_diameter_px, image_rgb.shape[1])
    focus = focus_measure(image_rgb, cell_diameter_px, estimate=False, small=small, small_gray=gray, lit=lit)
    seen = None if lit is None else lit > 0  # None: all of it (no boolean copies of a whole-field mask)
    n_seen = gray.size if seen is None else int(seen.sum())
    gray_mean = float((gray if seen is None else gray[seen]).mean()) if n_seen else 0.0
    if gray_mean < settings.min_mean_brightness:
        shown, limit = measured_beside_limit(gray_mean, settings.min_mean_brightness, places=0)
        return focus, f"too dark (mean brightness {shown} < {limit}): check the lamp"
    def share(mask: np.ndarray) -> float:  # of the lit field of view
        return (cv2.countNonZero(mask) if seen is None else int(((mask > 0) & seen).sum())) / max(1, n_seen)

    over = share(cv2.inRange(small, (250, 250, 250), (255, 255, 255)))
    if over > settings.max_overexposed_frac:
        return focus, f"overexposed ({over:.0%} of pixels saturated): lower the lamp or exposure"
    channels = cv2.split(small)  # once, contiguous: a compare on a channel's strided view copies it first
    shares = [share(cv2.compare(ch, CHANNEL_TOP, cv2.CMP_GE)) for ch in channels]
    c = int(np.argmax(shares))
    if shares[c] > MAX_CHANNEL_CLIPPED_FRAC:
        return focus, (f"overexposed in the {CHANNEL_NAMES[c]} channel ({shares[c]:.0%} of pixels at its "
                       "top): lower the lamp or exposure, or correct the camera's white balance")
    shares = [share(cv2.compare(ch, CHANNEL_BOTTOM, cv2.CMP_LE)) for ch in channels]
    c = int(np.argmax(shares))
    if shares[c] > MAX_CHANNEL_BLACK_FRAC:
        return focus, (f"colour cut off at black in the {CHANNEL_NAMES[c]} channel ({shares[c]:.0%} of pixels at "
                       "its bottom): lower the camera's saturation or contrast")
    contrast = local_contrast(gray, seen)
    if contrast is not None and contrast < MIN_LOCAL_CONTRAST:
        # before the colour and focus checks: bare glass is colourless and nothing in it is sharp, and their
        # advice (the camera's colour format, refocus) would send the technician the wrong way
        shown, limit = measured_beside_limit(contrast, MIN_LOCAL_CONTRAST, places=1)
        return focus, (f"nothing in view (an even, blank field: detail {shown} < {limit}): "
                       "move the stage onto the smear, or check that the slide is in place")
    from device.segment import quantile

    r, g, b = cv2.split(np.ascontiguousarray(small[::4, ::4]))  # every 4th pixel each way: plenty for "any colour"
    g4 = gray[::4, ::4]
    light = max(_CHROMA_LIGHT_FLOOR, quantile((g4 if seen is None else g4[seen[::4, ::4]]).ravel(), 0.9))
    chroma = quantile(cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)).ravel(), 0.99) * 240 / light
    if chroma < MIN_STAIN_CHROMA:
        # a grayscale picture saved in 3 channels (or with an opaque alpha) passes every channel check
        return focus, ("no stain colour (a grayscale picture): the classifier needs the colours of a stained "
                       "smear; check the camera's colour format")
    if focus < settings.min_focus:
        shown, limit = measured_beside_limit(focus, settings.min_focus)
        return focus, f"out of focus (sharpness {shown} < {limit}): refocus"
    return focus, None


def analyze_field(
    image_rgb: np.ndarray, classifier: Classifier, settings: AnalysisSettings | None = None, *,
    shown_size: tuple[int, int] | None = None,
) -> FieldResult:
    """Analyse one field: quality gate, segmentation, one batched classification, counts.

    Args:
        image_rgb: HxWx3 uint8 RGB frame.
        classifier: anything with ``predict(batch) -> p_infected``, ``threshold`` and ``input_size_px``.
        settings: quality-gate settings; the threshold defaults to the classifier's.
        shown_size: (width, height) of the picture itself when ``image_rgb`` was decoded reduced from it: the
            sizes a rejection names are given on the picture (the result's boxes and size stay as analysed).

    Returns:
        A :class:`FieldResult`; a rejected field has ``rejected`` set and counts of zero.

    Raises:
        ValueError: when the image is not HxWx3 uint8.
    """
    from device.segment import SegmentParams, estimate_cell_diameter, largest_trusted_diameter, segment_cells

    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        # the camera and file paths make frames so; a caller of its own got an OpenCV error from deep inside
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    settings = settings or AnalysisSettings()
    threshold = float(settings.threshold if settings.threshold is not None else classifier.threshold)
    h, w = image_rgb.shape[:2]
    shown_w, shown_h = shown_size or (w, h)
    k = shown_w / w  # picture px per analysed px, for the sizes said in a rejection
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    # the shortest long side on which the scale search trusts a cell as big as the classifier needs
    smallest = math.ceil(settings.min_cell_diameter_px / largest_trusted_diameter(1))
    if max(h, w) < smallest:
        # no cell in it can be both big enough for the classifier and small enough for the scale search
        # (under 0.95 of 1/5 of the picture): said so, not "use the 100x oil objective" (16 x 16 read so)
        timing["total_ms"] = (time.perf_counter() - t0) * 1000
        return FieldResult(w, h, f"picture too small for a field ({w}x{h} px): cells at least "
                           f"{settings.min_cell_diameter_px:.0f} px across and under 1/5 of the picture need "
                           f"{smallest} px on its long side: use the camera's whole picture, not a crop or a "
                           "thumbnail", [], 0.0, threshold, timing)
    halvings: list[np.ndarray] = []  # the frame's halvings, made once for the scale search and segmentation
    diameter = estimate_cell_diameter(image_rgb, halvings=halvings)  # once: for the focus scale and segmentation
    timing["scale_ms"] = (time.perf_counter() - t0) * 1000
    t = time.perf_counter()
    # a 1280 px wide frame's 640 px copy is its first halving (the same INTER_AREA resize)
    small = halvings[0] if halvings and w == 2 * FOCUS_WIDTH_PX and h % 2 == 0 else None
    focus, reason = image_quality(image_rgb, settings, diameter, small)
    timing["quality_ms"] = (time.perf_counter() - t) * 1000
    if reason:
        timing["total_ms"] = (time.perf_counter() - t0) * 1000
        return FieldResult(w, h, reason, [], focus, threshold, timing)

    if diameter is None:
        # A blank field, or a scale search stuck at its largest size (cells under ~1/35 of the picture,
        # out of focus, thick, not a smear): segmenting at that size counts cells many times too large.
        timing["total_ms"] = (time.perf_counter() - t0) * 1000
        return FieldResult(w, h, "no red cells of a consistent size found (a cell must span 1/50 to 1/5 of the "
                           "picture): empty area, thick area or not a blood smear, or cells too small or too large "
                           "for the picture (use the 100x oil objective)", [], focus, threshold, timing)
    t = time.perf_counter()
    seg = segment_cells(image_rgb, SegmentParams(cell_diameter_hint_px=diameter), halvings=halvings)
    timing["segment_ms"] = (time.perf_counter() - t) * 1000
    few = None
    if len(seg.cells) < settings.min_cells_per_field:
        few = f"too few red cells ({len(seg.cells)} found, {settings.min_cells_per_field} needed)"
    elif seg.foreground_frac < settings.min_foreground_frac:
        few = (f"red cells cover too little of the field ({100 * seg.foreground_frac:.0f}%, "
               f"{100 * settings.min_foreground_frac:.0f}% needed)")
    if few:
        timing["total_ms"] = (time.perf_counter() - t0) * 1000
        d = seg.cell_diameter_px
        few_fit_whole = (w - d) * (h - d) < FEW_FIT_WHOLE * d * d
        if few_fit_whole and max(w, h) >= NARROW_ASPECT * min(w, h):
            # a strip cut from a field: its cells are not too large, the picture is too narrow for them
            return FieldResult(w, h, f"{few}: picture too narrow for a field ({shown_w}x{shown_h} px, cells "
                               f"{k * d:.0f} px across): use the camera's whole picture, not a crop", [], focus,
                               threshold, timing)
        if few_fit_whole:
            # the cells cut by the frame's edge are dropped, and at a high magnification most are
            return FieldResult(w, h, f"{few}: cells too large in the picture ({k * d:.0f} px across, few fit whole): "
                               "use a lower magnification (the 100x objective) or a wider camera view; or an empty or "
                               "thick area", [], focus, threshold, timing)
        return FieldResult(w, h, f"{few}: empty area, thick area or not a blood smear", [], focus, threshold, timing)
    unusable = None
    needed = needed_background_gains(image_rgb)
    gains = background_gains(image_rgb, needed)  # what the crops are cut with (below)
    outline = float(np.median([2.0 * math.sqrt(c.area_px / math.pi) for c in seg.cells]))
    if outline < settings.min_outline_match * seg.cell_diameter_px:
        unusable = (f"cell outlines do not match the cell size found ({k * outline:.0f} px for "
                    f"{k * seg.cell_diameter_px:.0f} px): thick area, a stretched picture or not a blood smear")
    elif seg.cell_diameter_px < settings.min_cell_diameter_px:
        shown, limit = measured_beside_limit(k * seg.cell_diameter_px, k * settings.min_cell_diameter_px, places=0)
        unusable = (f"cells too small in the picture ({shown} px across, {limit} needed): use the 100x "
                    "objective or a higher camera resolution")
    elif needed.max() > BACKGROUND_GAIN_RANGE[1]:
        # the crops could not be brought to the light the model knows: with the gains capped at 2x, the
        # held-out IML fields at lamp 30% (gains 3.0-4.1 needed) were counted with 13 of 29 parasite cells
        # found, against 24 with the gains up to 4x and 25 at full light
        c = int(np.argmax(needed))
        unusable = (f"too dim for the classifier (the {CHANNEL_NAMES[c]} light of the background is "
                    f"{100 / needed[c]:.0f}% of what the model needs, {100 / BACKGROUND_GAIN_RANGE[1]:.0f}% at "
                    "least): raise the lamp or the exposure" +
                    (", or check the white balance" if needed.max() > 1.5 * needed.min() else ""))
    else:
        # the crops are cut after the background gains: a dim field's noise is amplified with it
        gain = float(np.dot(gains, (0.299, 0.587, 0.114)))
        noise = gain * noise_at_cell_scale(image_rgb, seg.cell_diameter_px, classifier.input_size_px)
        if noise > settings.max_noise:
            shown, limit = measured_beside_limit(noise, settings.max_noise)
            unusable = (f"too noisy (noise {shown} > {limit} at the classifier's scale): "
                        "more light, or lower the camera gain")
    timing["quality_ms"] += (time.perf_counter() - t) * 1000 - timing["segment_ms"]
    if unusable:
        timing["total_ms"] = (time.perf_counter() - t0) * 1000
        return FieldResult(w, h, unusable, [], focus, threshold, timing)

    t = time.perf_counter()
    crops = field_crops(image_rgb, seg.cells, gains)
    batch = prepare_batch(crops, classifier.input_size_px)
    timing["crop_ms"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    p = classifier.predict(batch)
    timing["classify_ms"] = (time.perf_counter() - t) * 1000
    cells = [CellVerdict(tuple(int(v) for v in c.bbox), float(pi), bool(pi >= threshold))
             for c, pi in zip(seg.cells, p, strict=True)]
    timing["total_ms"] = (time.perf_counter() - t0) * 1000
    return FieldResult(w, h, None, cells, focus, threshold, timing, [c.mask for c in seg.cells])


INFECTED_RGB = (220, 20, 60)
UNINFECTED_RGB = (0, 160, 80)
NEAR_RGB = (255, 176, 0)  # amber: scored just under the threshold, shown for review


def near_threshold(cell: CellVerdict, floor: float | None) -> bool:
    """A cell not flagged but scored from the review floor up (None: no floor), which a person is shown for
    review (the store's ``_NEAR`` says the same in SQL)."""
    return not cell.infected and floor is not None and cell.p_infected >= floor


def annotate(image_rgb: np.ndarray, result: FieldResult, near_from: float | None = None) -> np.ndarray:
    """A copy of the field with each cell boxed: red for infected, amber for a cell not flagged but scored
    from ``near_from`` up (near the threshold: shown for review; None: none), green for the others."""
    return draw_annotation(image_rgb.copy(), result, near_from)


def draw_annotation(out: np.ndarray, result: FieldResult, near_from: float | None = None, *,
                    bgr: bool = False) -> np.ndarray:
    """:func:`annotate`'s boxes drawn into ``out`` itself (RGB, or BGR with ``bgr``: the same colours), which
    is returned: for a caller that has a copy of its own to draw on (a full frame is 3 bytes a pixel)."""
    order = (lambda rgb: rgb[::-1]) if bgr else (lambda rgb: rgb)
    thick = max(1, round(max(out.shape[:2]) / 600))
    for c in result.cells:
        x, y, w, h = c.bbox
        near = near_threshold(c, near_from)
        colour = INFECTED_RGB if c.infected else NEAR_RGB if near else UNINFECTED_RGB
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), order(colour), thick + (1 if c.infected or near else 0))
    if result.rejected:
        cv2.putText(out, "REJECTED", (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.2, order(INFECTED_RGB), 3)
    return out
