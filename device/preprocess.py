"""The one preprocessing path from a cell crop to model input.

Used by ``train`` (dataset building), ``convert`` (representative data, parity checks) and the device
(field crops). The NIH cell images are tight boxes around one red cell with everything outside the
cell mask black; :func:`crop_cell` makes field crops the same way and :func:`prepare_cell` turns any
such crop into the model's input.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_INPUT_SIZE_PX = 48  # the shipped model's; the device reads the real size from the model

# A field's background (the plasma between the cells: the 95th percentile of each channel) is brought to
# this colour before cells are cut, so a dimmer lamp, another exposure or a colour cast does not change
# what the classifier sees. It is the mean background of the 40 IML training fields, whose crops the
# model trained on (README, "Field background").
REFERENCE_BACKGROUND_RGB = (197.3, 224.0, 202.0)
BACKGROUND_GAIN_RANGE = (0.5, 4.0)  # beyond this the picture is too far off to be corrected by gains


def background_rgb(image_rgb: np.ndarray) -> np.ndarray:
    """The field's background colour: the 95th percentile of each channel, on every 4th pixel."""
    from device.segment import quantile

    grid = image_rgb[::4, ::4].reshape(-1, 3)
    return np.array([quantile(grid[:, c], 0.95) for c in range(3)])


def needed_background_gains(image_rgb: np.ndarray) -> np.ndarray:
    """Per-channel gains (R, G, B) that would bring the field's background to the reference, unbounded."""
    return np.asarray(REFERENCE_BACKGROUND_RGB) / np.maximum(background_rgb(image_rgb), 1.0)


def background_gains(image_rgb: np.ndarray, needed: np.ndarray | None = None) -> np.ndarray:
    """Per-channel gains (R, G, B) that bring the field's background to the reference, within
    :data:`BACKGROUND_GAIN_RANGE` (``needed``: :func:`needed_background_gains` when the caller has them)."""
    return np.clip(needed_background_gains(image_rgb) if needed is None else needed, *BACKGROUND_GAIN_RANGE)


def _background_lut(image_rgb: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
    """The per-channel look-up table (256 x 1 x 3) that brings the background to the reference."""
    gains = background_gains(image_rgb) if gains is None else gains
    return np.clip(np.round(np.arange(256)[:, None] * gains[None, :]), 0, 255).astype(np.uint8).reshape(256, 1, 3)


def normalise_background(image_rgb: np.ndarray) -> np.ndarray:
    """Per-channel gains that bring the field's background to :data:`REFERENCE_BACKGROUND_RGB`."""
    return cv2.LUT(np.ascontiguousarray(image_rgb), _background_lut(image_rgb))


def field_crops(image_rgb: np.ndarray, cells, gains: np.ndarray | None = None) -> list[np.ndarray]:
    """Crops of a field's segmented cells (objects with ``mask`` and ``bbox``), the NIH way, cut from the
    field with its background normalised: what the device, the field scorer and the field-crop training
    set all classify. (The gains are applied to each crop: the same pixels as normalising the whole
    field first, black staying black, at a third of the cost.) ``gains``: :func:`background_gains` of
    this field when the caller has them already."""
    if not cells:
        return []
    lut = _background_lut(image_rgb, gains)
    return [cv2.LUT(crop_cell(image_rgb, c.mask, c.bbox), lut) for c in cells]


def prepare_cell(crop_rgb: np.ndarray, size_px: int = DEFAULT_INPUT_SIZE_PX) -> np.ndarray:
    """Turn a cell crop into model input.

    The crop is padded to a square on black (keeping the aspect ratio, centred), then resized to
    ``size_px``. Normalisation is the model's first layer, so the result is raw RGB uint8.

    Args:
        crop_rgb: HxWx3 uint8 RGB crop, background outside the cell already black.
        size_px: side of the square model input.

    Returns:
        ``(size_px, size_px, 3)`` uint8 RGB array.
    """
    if crop_rgb.ndim != 3 or crop_rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB crop, got shape {crop_rgb.shape}")
    if crop_rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {crop_rgb.dtype}")
    h, w = crop_rgb.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("empty crop")
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = crop_rgb
    # INTER_AREA when shrinking avoids aliasing of the parasite's small dark dots.
    interp = cv2.INTER_AREA if side > size_px else cv2.INTER_LINEAR_EXACT
    return cv2.resize(square, (size_px, size_px), interpolation=interp)


def crop_cell(image_rgb: np.ndarray, mask: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """Cut one cell out of a field the NIH way: tight box, everything outside the mask black.

    Args:
        image_rgb: HxWx3 uint8 RGB field.
        mask: boolean or 0/255 mask of this cell, either full-field (HxW) or box-sized (h x w).
        bbox: ``(x, y, w, h)`` of the cell in field pixels.

    Returns:
        h x w x 3 uint8 crop.
    """
    x, y, w, h = (int(v) for v in bbox)
    region = image_rgb[y : y + h, x : x + w]
    if region.size == 0:
        raise ValueError(f"empty box {tuple(bbox)} in a {image_rgb.shape[1]}x{image_rgb.shape[0]} field")
    m = mask[y : y + h, x : x + w] if mask.shape[:2] == image_rgb.shape[:2] else mask
    if m.shape[:2] != region.shape[:2]:
        raise ValueError(f"mask shape {m.shape[:2]} does not match box {region.shape[:2]}")
    m8 = m.view(np.uint8) if m.dtype == np.bool_ else (m != 0).astype(np.uint8)
    return cv2.bitwise_and(region, region, mask=np.ascontiguousarray(m8))  # outside the mask: 0


def prepare_batch(crops: list[np.ndarray], size_px: int = DEFAULT_INPUT_SIZE_PX) -> np.ndarray:
    """Stack prepared crops into an ``(n, size_px, size_px, 3)`` uint8 batch."""
    if not crops:
        return np.zeros((0, size_px, size_px, 3), dtype=np.uint8)
    return np.stack([prepare_cell(c, size_px) for c in crops])
