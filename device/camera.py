"""Cameras behind one small protocol, and the live feed that keeps the latest frame.

Every camera has ``read() -> HxWx3 uint8 RGB`` and ``close()`` and is a context manager:

- :class:`Picamera2Camera`: a Raspberry Pi camera module through picamera2 (imported only when chosen:
  it needs libcamera, which exists only on a Pi). We ask for the pinned format ``"BGR888"``:
  picamera2 names formats in the reverse of memory order, so ``"BGR888"`` frames are R, G, B in memory.
- :class:`OpenCVCamera`: a USB microscope camera through OpenCV/V4L2 (device index or path); OpenCV
  delivers BGR, converted here to RGB.
- :class:`ReplayCamera`: a folder of images or a video file, decoded for real with OpenCV and looped,
  paced at a frame rate: the demo and the tests.

:class:`CameraFeed` owns one camera in a thread: it keeps the latest frame with its focus measure and
steadiness, and when the camera is missing or disappears it keeps running and reconnects with an
exponential back-off capped at ``camera.reconnect_max_s``.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from device.imageio import (
    IMAGE_SUFFIXES,
    JPEG_DECODE_LOCK,
    MAX_SERVICE_FIELD_PIXELS,
    MIN_SIDE_PX,
    ImageError,
    apply_orientation,
    decode_field,
    read_image_bytes,
    to_rgb8,
)

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".mjpg", ".mjpeg"}
# picamera2 format names are the reverse of memory order: "BGR888" is R, G, B bytes in memory.
PICAMERA2_FORMAT = "BGR888"


class CameraError(RuntimeError):
    """The camera cannot be opened or stopped delivering frames; the message says what to check."""


class Camera(Protocol):
    def read(self) -> np.ndarray:
        """The next frame as HxWx3 uint8 RGB. Raises :class:`CameraError` when none can be had."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Camera: ...

    def __exit__(self, *exc: object) -> None: ...


class CameraBase:
    """What every :class:`Camera` shares: ``with camera:`` closes it on the way out.

    Implementations (and test doubles) subclass it and provide ``read`` and ``close``.
    """

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass


class ReplayCamera(CameraBase):
    """Replay a folder of images (sorted, looped, re-listed each loop) or a video file (looped).

    Args:
        path: a folder of images or a video file.
        fps: frames per second; :meth:`read` sleeps so frames come no faster, like a real camera.
        turns: each pass over the folder shows the pictures turned the next of 8 ways (the EXIF
            orientations 1-8: mirrored and/or rotated), for a demo with few pictures.
        hold_s: a folder's picture is shown this long (its frames repeated) before the next, as a
            microscope shows one field until the stage moves: a still view, so the page's auto-capture
            (a steady, sharp view) has something to take. 0: the next picture on every frame.
    """

    def __init__(self, path: str | Path, fps: float = 2.0, turns: bool = False, hold_s: float = 0.0):
        self.path = Path(path)
        self.turns = turns
        self.hold_s = hold_s
        self._held: np.ndarray | None = None
        self._held_until = 0.0
        self._pass = 0
        self.frame_interval_s = 1.0 / fps
        self._next_t = 0.0
        self._video: cv2.VideoCapture | None = None
        self._files: list[Path] = []
        self._index = 0
        if self.path.is_dir():
            self._rescan()
        elif self.path.is_file() and self.path.suffix.lower() in VIDEO_SUFFIXES:
            self._video = cv2.VideoCapture(str(self.path))
            if not self._video.isOpened():
                raise CameraError(f"replay video cannot be opened: {self.path}")
        elif self.path.is_file():
            raise CameraError(f"replay path is not a folder or a video ({', '.join(sorted(VIDEO_SUFFIXES))}): "
                              f"{self.path}")
        else:
            raise CameraError(f"replay folder or video not found: {self.path}")

    def _rescan(self) -> None:
        if not self.path.is_dir():
            raise CameraError(f"replay folder is gone: {self.path}")
        self._files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if self._files and self._index:  # a new pass (not the first listing)
            self._pass += 1
        self._index = 0
        if not self._files:
            raise CameraError(f"replay folder has no images: {self.path}")

    def _pace(self) -> None:
        now = time.monotonic()
        if self._next_t > now:
            time.sleep(self._next_t - now)
            now = self._next_t
        self._next_t = now + self.frame_interval_s

    def read(self) -> np.ndarray:
        self._pace()
        if self._video is not None:
            return self._read_video()
        now = time.monotonic()
        if self._held is not None and now < self._held_until:
            return self._held.copy()  # the stage has not moved: the same view
        rgb = self._next_picture()
        if self.hold_s > 0:
            self._held, self._held_until = rgb, now + self.hold_s
        return rgb

    def _next_picture(self) -> np.ndarray:
        for _ in range(max(1, len(self._files))):
            if self._index >= len(self._files):
                self._rescan()
            path = self._files[self._index]
            self._index += 1
            try:
                # the service's limit for a field (its memory), as for an upload: a one-scan colour JPEG of large
                # cells is decoded reduced up to 50 MP, anything else whole up to 25 MP
                rgb = decode_field(read_image_bytes(path), name=str(path), max_whole_pixels=MAX_SERVICE_FIELD_PIXELS,
                                   limit_note=" of the device's fields")[0]
                return apply_orientation(rgb, 1 + self._pass % 8) if self.turns else rgb
            except ImageError as exc:
                if not path.exists():
                    raise CameraError(f"replay image vanished: {path}") from exc
                logger.warning("replay: skipping unreadable image: %s", exc)
        raise CameraError(f"replay folder has no readable images: {self.path}")

    def _read_video(self) -> np.ndarray:
        assert self._video is not None
        ok, frame = _grab_and_decode(self._video)
        if not ok:  # end of file: loop
            self._video.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = _grab_and_decode(self._video)
        if not ok or frame is None:
            raise CameraError(f"replay video gives no frames: {self.path}")
        return to_rgb8(frame, name=str(self.path), bgr=True)

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None


def _grab_and_decode(cap: cv2.VideoCapture) -> tuple[bool, np.ndarray | None]:
    """``cap.read()``, with the decoding under :data:`~device.imageio.JPEG_DECODE_LOCK`: grab waits for the
    frame, retrieve decodes it (an MJPG frame with libjpeg), so that an upload's check for damaged JPEG data
    hears only its own file's warnings, and the wait for a frame holds no upload up."""
    if not cap.grab():
        return False, None
    with JPEG_DECODE_LOCK:
        return cap.retrieve()


class OpenCVCamera(CameraBase):
    """A USB (UVC) microscope camera through OpenCV: V4L2 on Linux. Frames come BGR; returned RGB.

    Args:
        device: an index (``"0"``) or a path (``"/dev/video0"``; a video file works too, for tests).
        width, height: the requested size; the camera may pick the nearest it supports.
    """

    def __init__(self, device: str | int = "0", width: int = 1280, height: int = 960):
        source: int | str = int(device) if str(device).isascii() and str(device).isdigit() else str(device)
        self.device = source
        v4l2 = sys.platform.startswith("linux") and (isinstance(source, int) or str(source).startswith("/dev/"))
        self._cap = cv2.VideoCapture(source, cv2.CAP_V4L2 if v4l2 else cv2.CAP_ANY)
        if not self._cap.isOpened():
            self._cap.release()
            raise CameraError(f"no camera at {device!r}")
        if v4l2:
            # Most USB microscopes reach full resolution only in MJPG; OpenCV decodes it to BGR.
            self._cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            # One buffered frame: a capture shows the stage as it is now, not a queued old frame.
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def read(self) -> np.ndarray:
        ok, frame = _grab_and_decode(self._cap)
        if not ok or frame is None:
            raise CameraError(f"camera {self.device!r} stopped delivering frames (unplugged?)")
        if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] in (3, 4):
            # a fourth channel is the X padding of XBGR formats, not transparency
            return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB if frame.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        return frame  # grayscale, 16-bit or another layout: check_frame names it; the camera is still there

    def close(self) -> None:
        self._cap.release()


class Picamera2Camera(CameraBase):
    """A Raspberry Pi camera module through picamera2, asking for the pinned ``"BGR888"`` format.

    picamera2 comes from apt (``python3-picamera2``); the venv needs ``--system-site-packages`` to see it.
    """

    def __init__(self, width: int = 1280, height: int = 960):
        try:
            from picamera2 import Picamera2  # Pi-only (libcamera): imported here, never at module top
        except ImportError as exc:
            raise CameraError("picamera2 is not installed: apt install python3-picamera2 and create the venv "
                              "with --system-site-packages") from exc
        self._cam = None
        try:
            cam = Picamera2()
            self._cam = cam
            config = cam.create_video_configuration(main={"size": (width, height), "format": PICAMERA2_FORMAT})
            cam.configure(config)
            cam.start()
        except Exception as exc:  # libcamera raises IndexError/RuntimeError when no camera is attached
            self.close()
            raise CameraError(f"Raspberry Pi camera not available: {type(exc).__name__}: {exc} "
                              "(check the ribbon cable and `rpicam-hello --list-cameras`)") from exc
        self.size = (width, height)

    def read(self) -> np.ndarray:
        if self._cam is None:
            raise CameraError("Raspberry Pi camera is closed")
        try:
            frame = self._cam.capture_array("main")
        except Exception as exc:
            raise CameraError(f"Raspberry Pi camera stopped: {type(exc).__name__}: {exc}") from exc
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] not in (3, 4):
            raise CameraError(f"Raspberry Pi camera gave an unexpected frame shape {frame.shape}")
        # BGR888 is R, G, B in memory already; a 4-channel buffer (XBGR8888) carries padding last.
        return np.ascontiguousarray(frame[:, :, :3])

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()


def open_camera(camera_config) -> Camera:
    """Open the camera that ``config.camera.source`` names. Raises :class:`CameraError`."""
    c = camera_config
    if c.source == "replay":
        return ReplayCamera(c.replay_path, c.replay_fps, turns=getattr(c, "replay_turns", False),
                            hold_s=getattr(c, "replay_hold_s", 0.0))
    if c.source == "opencv":
        return OpenCVCamera(c.device, c.width, c.height)
    if c.source == "picamera2":
        return Picamera2Camera(c.width, c.height)
    raise CameraError(f"unknown camera source {c.source!r}")


# --- the live feed -----------------------------------------------------------------------------

FOCUS_INTERVAL_S = 0.25  # focus is measured at most this often: ~30 ms per frame on a Pi 4
STEADY_WIDTH_PX = 160  # steadiness compares small gray copies: stage motion, not sensor noise
STEADY_MAX_DIFF = 3.0  # mean absolute gray difference (0-255) between frames of a still stage
STEADY_MIN_S = 1.0  # the stage must be still this long before a field counts as steady


# A thumbnail is at most this many times as tall as wide: a 16 x 100,000 px upload (5 kB as a PNG) made a
# 160 x 1,000,000 thumbnail, and its four turns 640 MB. Such a picture is no field (the analysis refuses it).
MAX_THUMBNAIL_ASPECT = 8
MAX_TURNED_VIEW_ASPECT = 4  # turns of an upload taller than this are not compared: no field's view is


def _thumbnail_size(w: int, h: int) -> tuple[int, int]:
    return STEADY_WIDTH_PX, max(1, min(MAX_THUMBNAIL_ASPECT * STEADY_WIDTH_PX, round(h * STEADY_WIDTH_PX / w)))


def thumbnail(rgb: np.ndarray, shown_size: tuple[int, int] | None = None) -> np.ndarray:
    """A small gray copy of a frame: what steadiness and "this field is already counted" compare.
    ``shown_size``: the picture's (width, height) when ``rgb`` was decoded reduced from it: the thumbnail takes
    the picture's shape (a 4600 x 3493 JPEG read at 1/2 is 2300 x 1747, a thumbnail a row taller than the same
    picture's decoded whole, and views of two shapes are never compared)."""
    w, h = shown_size or (rgb.shape[1], rgb.shape[0])
    return cv2.cvtColor(cv2.resize(rgb, _thumbnail_size(w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)


def turned_views(rgb: np.ndarray, shown_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The :func:`thumbnail` of each of the picture's 7 other turns and mirrors (90, 180, 270 degrees, each
    also mirrored): a picture uploaded again turned is the same cells. Made from a copy 4 times the
    thumbnail's width, not from the picture (a 24 MP upload turned 7 times is 500 MB), at the shape
    :func:`thumbnail` gives the picture turned (``shown_size`` as there)."""
    h, w = rgb.shape[:2]
    mid_w = 4 * STEADY_WIDTH_PX
    mid = rgb if w <= mid_w else cv2.resize(rgb, (mid_w, max(1, round(h * mid_w / w))), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(mid, cv2.COLOR_RGB2GRAY)
    sw, sh = shown_size or (w, h)
    out = []
    for k in range(4):
        for mirror in (False, True):
            if k == 0 and not mirror:
                continue
            t = np.rot90(gray, k)
            t = t[:, ::-1] if mirror else t
            tw, th = (sw, sh) if k % 2 == 0 else (sh, sw)  # the turned picture's own size
            size = _thumbnail_size(tw, th)
            if size[1] > MAX_TURNED_VIEW_ASPECT * size[0]:  # a strip on end: no field's view has that shape
                continue
            out.append(cv2.resize(np.ascontiguousarray(t), size, interpolation=cv2.INTER_AREA))
    return out


def encode_view(view: np.ndarray) -> bytes:
    """A thumbnail as PNG bytes (lossless: a restored view compares exactly as the one kept in memory)."""
    ok, buf = cv2.imencode(".png", view)
    if not ok:
        raise ValueError("the view thumbnail could not be encoded")
    return buf.tobytes()


def decode_view(png: bytes) -> np.ndarray | None:
    """The thumbnail :func:`encode_view` wrote, or None when the bytes are not one."""
    view = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    return view if view is not None and view.size else None


def frames_alike(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two thumbnails differ by no more than sensor noise: the stage has not moved (steadiness).

    One gain is taken out first: a lamp that flickers or an exposure that settles is no movement (compared
    with the frame the stage came to rest on, +-2% flicker read as motion 90% of the time).
    """
    if a.shape != b.shape:
        return False
    gain = _lamp_gain(float(a.mean()), float(b.mean()))
    if gain is not None:
        return float(np.abs(a.astype(np.float32) - b.astype(np.float32) * gain).mean()) <= STEADY_MAX_DIFF
    return float(cv2.absdiff(a, b).mean()) <= STEADY_MAX_DIFF


def _lamp_gain(ma: float, mb: float) -> float | None:
    """The gain that brings a view of mean ``mb`` to mean ``ma`` when it is a lamp's or an exposure's nudge
    (within :data:`SAME_VIEW_MAX_GAIN`), else None (far brighter or darker, or a black view)."""
    if ma > 0 and mb > 0 and SAME_VIEW_MAX_GAIN ** -1 <= ma / mb <= SAME_VIEW_MAX_GAIN:
        return ma / mb
    return None


# "Already counted": thumbnails compared after a light blur, with the lamp's level matched (one gain) and
# a shift of up to 1.5 thumbnail pixels (~12 px of a 1280 px frame) aligned. Measured on 800x600 windows of
# the 64 shared fields (60 each): the same window after a lamp change of -5..+10%, a drift of 1-4 px, a refocus with a
# 3 px drift: 60 of 60 within 4.0 each (a plain difference of 3 let a lamp change of 3% or a drift of 4 px
# count a field again, with no warning; 8 px and more is also the overlap check's); 2,016 pairs of
# different fields never came closer than 15.5.
SAME_VIEW_MAX_DIFF = 4.0
# ...and within this share of the views' own contrast (their mean absolute deviation): in a thin area, two
# different fields of 10 cells each on bare plasma differ by little in gray levels, and 171 of 2,016 such
# pairs (the 64 shared fields, 10 segmented cells of each kept on their plasma) were refused as "already
# counted". The same window after the changes above measured at most 0.11 of the contrast, different fields
# (dense or thin) at least 0.80 (tests/benchmarks/bench_same_view.py).
SAME_VIEW_MAX_DIFF_OF_CONTRAST = 0.4
# ...but never under this many gray levels (the thumbnails' rounding and the lamp gain's error): a field of a
# few cells, three-quarters empty, captured again after a 10-20% lamp change and a 3 px drift differed by
# 0.4 against a limit of 0.2, and 24 of 192 such captures were counted again.
SAME_VIEW_MIN_LIMIT = 0.75
SAME_VIEW_BLUR_PX = 1.5
# Aligned, the same window still differs: resampling a frame moved by a fraction of a thumbnail pixel is not
# shifting its thumbnail. A drift of 6-10 px of a 1,536 px frame (0.6-1.0 thumbnail px) left 3.5-5.2 gray
# levels (at most 0.13 of the views' contrast) against the limit of 4: the field counted again, and too
# little moved for the overlap warning (from 1 thumbnail px). Aligned views are held to the share of
# their contrast, up to this many levels; different fields never came closer than 15.5 unaligned.
SAME_VIEW_MAX_DIFF_ALIGNED = 8.0
SAME_VIEW_MAX_GAIN = 1.25


# A view narrower than this on a side is too small to blur or align: compared pixel by pixel as it is
VIEW_MIN_SIDE_PX = 8


def view_blurred(view: np.ndarray) -> np.ndarray | None:
    """The blurred copy of a thumbnail that :func:`same_view` compares (made once, for many comparisons); None
    for a view under :data:`VIEW_MIN_SIDE_PX`, which is compared as it is."""
    if min(view.shape) < VIEW_MIN_SIDE_PX:
        return None
    return cv2.GaussianBlur(view.astype(np.float32), (0, 0), SAME_VIEW_BLUR_PX)


def same_view(a: np.ndarray, b: np.ndarray, blurred_a: np.ndarray | None = None,
              blurred_b: np.ndarray | None = None) -> bool:
    """True when two thumbnails show the same field of the smear: captured again after the lamp, the
    exposure or the focus changed a little, or the stage settled by a few pixels. ``blurred_a`` and
    ``blurred_b``: their :func:`view_blurred` copies, when already made."""
    if a.shape != b.shape or min(a.shape) < VIEW_MIN_SIDE_PX:
        return a.shape == b.shape and float(cv2.absdiff(a, b).mean()) <= STEADY_MAX_DIFF
    fa = view_blurred(a) if blurred_a is None else blurred_a
    fb = view_blurred(b) if blurred_b is None else blurred_b
    ma, mb = float(fa.mean()), float(fb.mean())
    if ma > 0 and mb > 0:  # the lamp or the exposure: one gain over the view...
        gain = _lamp_gain(ma, mb)
        if gain is None:
            return False  # ...not far brighter or darker (a blank view must not match every other)
        fb = fb * gain
    h, w = a.shape
    m = 2  # a margin the shift may bring in from outside
    core, core_b = fa[m : h - m, m : w - m], fb[m : h - m, m : w - m]
    contrast = 0.5 * (float(cv2.absdiff(core, float(core.mean())).mean())
                      + float(cv2.absdiff(core_b, float(core_b.mean())).mean()))
    limit = min(SAME_VIEW_MAX_DIFF, max(SAME_VIEW_MIN_LIMIT, SAME_VIEW_MAX_DIFF_OF_CONTRAST * contrast))
    diff = float(cv2.absdiff(core, core_b).mean())
    if diff <= limit or diff > 4 * SAME_VIEW_MAX_DIFF:  # the same, or plainly another field
        return diff <= limit
    # a stage that settled by a fraction of a thumbnail pixel: aligned first (phase correlation, sub-pixel)
    window = _hanning(w, h)
    (dx, dy), _ = cv2.phaseCorrelate((fa - ma) * window, (fb - float(fb.mean())) * window)
    if max(abs(dx), abs(dy)) > 1.5:
        return False  # moved further: the overlap check's case
    aligned_limit = min(SAME_VIEW_MAX_DIFF_ALIGNED, max(SAME_VIEW_MIN_LIMIT, SAME_VIEW_MAX_DIFF_OF_CONTRAST * contrast))
    for sx, sy in ((dx, dy), (-dx, -dy)):
        shifted = cv2.warpAffine(fb, np.float32([[1, 0, sx], [0, 1, sy]]), (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
        if float(cv2.absdiff(core, shifted[m : h - m, m : w - m]).mean()) <= aligned_limit:
            return True
    return False


# Phase correlation of two thumbnails of one smear peaks where the stage moved; measured on windows cut
# from 34 real fields (tests/benchmarks/bench_overlap.py): two different fields never reached a response
# of 0.18, and windows overlapping by 60% or more never fell below 0.34.
OVERLAP_MIN_RESPONSE = 0.3


def view_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """The share (0..1) of view ``a`` that view ``b`` shows too, from the stage shift between them.

    0.0 when the two do not match (the correlation's response is below :data:`OVERLAP_MIN_RESPONSE`) or
    when the shift is under one thumbnail pixel: a pattern that does not move with the stage (dust on the
    sensor, uneven light) correlates at zero shift in every pair of views, and an unmoved stage is what
    :func:`same_view` is for. Each thumbnail is high-passed first, so the lamp's falloff does not match.
    """
    return prepared_overlap(prepare_view(a), prepare_view(b))


def prepare_view(view: np.ndarray) -> np.ndarray:
    """A thumbnail high-passed for :func:`prepared_overlap` (kept with a counted view: done once)."""
    f = view.astype(np.float32)
    return f - cv2.GaussianBlur(f, (0, 0), 6)


def prepared_overlap(fa: np.ndarray, fb: np.ndarray) -> float:
    """:func:`view_overlap` of two :func:`prepare_view` results."""
    if fa.shape != fb.shape or min(fa.shape) < VIEW_MIN_SIDE_PX:
        return 0.0
    h, w = fa.shape
    window = _hanning(w, h)
    # windowed into new arrays: given the window, OpenCV 4.11 multiplies its inputs by it in place, and the
    # counted fields' prepared views, shrunk at every comparison, soon matched every new field
    (dx, dy), response = cv2.phaseCorrelate(fa * window, fb * window)
    if response < OVERLAP_MIN_RESPONSE or max(abs(dx), abs(dy)) < 1.0:
        return 0.0
    return max(0.0, 1 - abs(dx) / w) * max(0.0, 1 - abs(dy) / h)


@functools.lru_cache(maxsize=4)
def _hanning(w: int, h: int) -> np.ndarray:
    return cv2.createHanningWindow((w, h), cv2.CV_32F)
HEARTBEAT_STALE_S = 20.0  # no loop iteration for this long: the capture loop is stuck
# A connected camera whose newest picture is older than this (or than 5 of its own frame intervals, for a
# slow replay) has stalled: a driver stuck in read() left the page saying "connected, steady, sharp" over a
# frozen picture for 20 s, and Capture stored that picture.
STALLED_AFTER_S = 3.0
RECONNECT_MIN_S = 0.5
BAD_FRAME_PAUSE_S = 0.1  # after an unusable frame: a camera that fails at once must not spin the CPU


@dataclass(frozen=True)
class Frame:
    """One camera frame; ``rgb`` is None and ``problem`` says why when the frame cannot be analysed."""

    seq: int
    rgb: np.ndarray | None
    t: float  # time.monotonic() when read
    focus: float | None
    problem: str | None = None


def check_frame(frame: object) -> tuple[np.ndarray | None, str | None]:
    """A camera's frame as HxWx3 uint8 RGB, or (None, why it cannot be analysed).

    Every camera class already returns RGB uint8; this guards the feed against a driver or a camera
    class that returns something else (None, 16-bit, grayscale, another shape), which would otherwise
    stop the capture loop. A fourth channel is the padding of XRGB formats and is dropped.
    """
    if frame is None:
        return None, "the camera sent no picture"
    if not isinstance(frame, np.ndarray):
        return None, f"the camera sent a {type(frame).__name__}, not a picture"
    if frame.dtype != np.uint8:
        return None, (f"the camera sent {frame.dtype.itemsize * 8}-bit {frame.dtype} pixels, not 8-bit colour: "
                      "check the camera's pixel format")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return None, "the camera sent a grayscale picture: the stain colours are needed; check its colour format"
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        return None, f"the camera sent an array of shape {tuple(frame.shape)}, not height x width x 3 colours"
    if min(frame.shape[:2]) < MIN_SIDE_PX:
        return None, f"the camera sent a {frame.shape[1]}x{frame.shape[0]} picture, too small to analyse"
    return np.ascontiguousarray(frame[:, :, :3]), None


class CameraFeed:
    """Owns one camera in a thread; keeps the latest frame; reconnects with capped back-off.

    Args:
        open_camera: returns an opened camera, or raises (any exception counts as "no camera").
        reconnect_max_s: the longest wait between reconnection attempts.
        min_focus: focus below this is shown as "not sharp".
        source: a name for the status ("replay", "opencv", "picamera2").
        focus: the focus measure (default: a ``device.analysis.FocusMeter``).
    """

    def __init__(self, open_camera: Callable[[], Camera], *, reconnect_max_s: float = 30.0,
                 min_focus: float = 2.4, source: str = "camera",
                 focus: Callable[[np.ndarray], float] | None = None, reconnect_min_s: float = RECONNECT_MIN_S):
        if focus is None:
            from device.analysis import FocusMeter

            focus = FocusMeter()
        self._open = open_camera
        self._reopen = False  # set by reopen(): close the camera and open the (new) one
        self._wake = threading.Event()  # cuts a back-off wait short (stop, reopen)
        self._bad_frames = 0
        self._focus_fn = focus
        self.reconnect_max_s = float(reconnect_max_s)
        self.reconnect_min_s = min(float(reconnect_min_s), self.reconnect_max_s)
        self.min_focus = float(min_focus)
        self.source = source
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frame: Frame | None = None
        self._state = "connecting"
        self._message: str | None = None
        self._since = time.time()
        self._seq = 0
        self._reconnects = 0
        self._next_retry_t: float | None = None
        self._heartbeat = time.monotonic()
        self._focus: float | None = None
        self._focus_t = 0.0
        self._small_prev: np.ndarray | None = None
        self._still_since: float | None = None
        self._scene = 0
        self._fps = 0.0
        self._interval_hint = 0.0  # the camera's own frame interval, when it says (a replay does)
        self._preview: tuple[int, int, bytes] | None = None  # (seq, max_width, jpeg)
        self._preview_lock = threading.Lock()
        self._new_frame = threading.Condition(self._lock)

    # -- lifecycle --
    def start(self) -> CameraFeed:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="camera-feed", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def reopen(self, open_camera: Callable[[], Camera], source: str) -> None:
        """Switch to another camera (an admin changed ``camera.source``): close this one, open that one."""
        with self._lock:
            self._open, self.source, self._reopen = open_camera, source, True
        self._wake.set()
        logger.info("camera source changed to %s: reopening", source)

    def __enter__(self) -> CameraFeed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop --
    def _set_state(self, state: str, message: str | None) -> None:
        with self._lock:
            if state != self._state:
                self._since = time.time()
            self._state, self._message = state, message
            if state != "connected":
                self._frame = None
                self._small_prev = None
                self._still_since = None
                self._fps = 0.0  # no pictures: no rate (it showed the last one's, or a burst's, while lost)

    def _wait(self, seconds: float) -> None:
        """Sleep in short slices, keeping the heartbeat fresh, until stopped or woken."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            left = end - self._heartbeat
            if left <= 0 or self._reopen:
                return
            self._wake.wait(min(left, 1.0))
            self._wake.clear()

    def _run(self) -> None:
        cam: Camera | None = None
        backoff = self.reconnect_min_s
        warned: str | None = None  # the failure last logged: once per failure, not once per retry
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                if self._reopen:
                    with self._lock:
                        self._reopen = False
                    if cam is not None:
                        self._close_quietly(cam)
                        cam = None
                    self._set_state("connecting", None)
                    backoff = self.reconnect_min_s
                    warned = None  # another camera: its first failure is news
                if cam is None:
                    try:
                        cam = self._open()
                    except Exception as exc:
                        msg = str(exc) or type(exc).__name__
                        if warned != msg:
                            warned = msg
                            logger.warning("camera unavailable: %s (retrying, at most every %.0f s)",
                                           msg, self.reconnect_max_s)
                        self._set_state("disconnected", msg)
                        self._next_retry_t = time.time() + backoff
                        self._wait(backoff)
                        backoff = min(backoff * 2, self.reconnect_max_s)
                        continue
                    self._next_retry_t = None
                    streamed = False  # a loss is counted only once this camera has given a frame
                    with self._lock:  # a replay's own pace (down to one picture in 10 s) is no stall
                        self._interval_hint = float(getattr(cam, "frame_interval_s", 0.0) or 0.0)
                    if warned is not None:  # still failing as logged: said when a frame comes, not per retry
                        logger.debug("camera opened (%s), waiting for a frame", self.source)
                    elif self._seq or self._reconnects:
                        logger.info("camera reconnected (%s)", self.source)
                    else:
                        logger.info("camera connected (%s)", self.source)
                    self._set_state("connecting", None)  # "connected" once a frame has come
                try:
                    rgb = cam.read()
                except Exception as exc:
                    # A camera that opens but gives no frame (an empty replay, a V4L2 node that never
                    # streams) is retried with the same back-off as one that does not open: never a busy loop.
                    msg = str(exc) or type(exc).__name__
                    if warned != msg:
                        warned = msg
                        logger.warning("camera lost: %s (retrying, at most every %.0f s)", msg, self.reconnect_max_s)
                    self._close_quietly(cam)
                    cam = None
                    if streamed:  # a camera that opens but never streams was not lost: it never came
                        with self._lock:
                            self._reconnects += 1
                    self._set_state("disconnected", msg)
                    self._next_retry_t = time.time() + backoff
                    self._wait(backoff)
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
                streamed = True
                if warned is not None:  # the camera answered (even with a bad frame): its next failure is news
                    logger.info("camera reconnected (%s): frames again after %s", self.source, warned)
                    warned = None
                rgb, problem = check_frame(rgb)
                if problem is None:
                    try:
                        self._on_frame(rgb)
                        backoff = self.reconnect_min_s  # reset only by a frame, not by an open
                        continue
                    except Exception as exc:  # whatever a frame does, the loop keeps turning
                        logger.debug("frame handling failed", exc_info=True)
                        problem = f"the camera sent a picture that could not be handled ({type(exc).__name__})"
                self._on_bad_frame(problem)
                self._wait(BAD_FRAME_PAUSE_S)
        finally:
            if cam is not None:
                self._close_quietly(cam)

    @staticmethod
    def _close_quietly(cam: Camera) -> None:
        try:
            cam.close()
        except Exception:  # a vanished device can fail to close; nothing more to do
            logger.debug("camera close failed", exc_info=True)

    def _on_bad_frame(self, problem: str) -> None:
        """Keep an unusable frame as the latest, with its reason: a capture stores it as a rejected field."""
        with self._lock:
            changed = self._state != "faulty" or self._message != problem
            self._bad_frames += 1
            self._seq += 1
            self._frame = Frame(self._seq, None, time.monotonic(), None, problem)
            self._small_prev = None
            self._still_since = None
            if changed:
                self._state, self._message, self._since = "faulty", problem, time.time()
            self._new_frame.notify_all()
        if changed:  # once per problem, not once per frame
            logger.warning("camera frames unusable: %s", problem)

    def _on_frame(self, rgb: np.ndarray) -> None:
        now = time.monotonic()
        if now - self._focus_t >= FOCUS_INTERVAL_S or self._focus is None:
            self._focus = self._focus_fn(rgb)
            self._focus_t = now
        small = thumbnail(rgb)
        with self._lock:
            # against the frame the stage came to rest on, not the previous one: a stage creeping a little
            # each frame (3-6% of the view a second at 30 fps) read as still, and auto-capture fired mid-move
            ref = self._small_prev
            moved = ref is None or not frames_alike(ref, small)
            if moved:
                if self._still_since is not None or ref is None:
                    self._scene += 1
                self._still_since = None
                self._small_prev = small
            elif self._still_since is None:
                self._still_since = self._frame.t if self._frame is not None else now
            if self._frame is not None:
                dt = now - self._frame.t
                if dt > 0:
                    self._fps = 0.8 * self._fps + 0.2 / dt if self._fps else 1.0 / dt
            self._seq += 1
            self._frame = Frame(self._seq, rgb, now, self._focus)
            if self._state != "connected":
                if self._state == "faulty":
                    logger.info("camera frames usable again")
                self._state, self._message, self._since = "connected", None, time.time()
            self._new_frame.notify_all()

    # -- what the service and the page read --
    def latest(self) -> Frame | None:
        """The latest frame, or None while the camera is disconnected.

        While the camera sends unusable frames ("faulty"), the frame has ``rgb`` None and a ``problem``.
        """
        with self._lock:
            return self._frame

    def wait_frame(self, after_seq: int = 0, timeout_s: float = 5.0) -> Frame | None:
        """Block until a frame newer than ``after_seq`` arrives (or timeout); None if none came."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while self._frame is None or self._frame.seq <= after_seq:
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._new_frame.wait(min(left, 0.5))
            return self._frame

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._state == "connected"

    def loop_healthy(self) -> bool:
        """The capture loop is alive and turning (for the systemd watchdog)."""
        return (self._thread is not None and self._thread.is_alive()
                and time.monotonic() - self._heartbeat < HEARTBEAT_STALE_S)

    def _stalled_s(self, frame: Frame | None) -> float | None:
        """Under the lock: how long a connected camera has sent no new picture, when that is a stall."""
        if self._state != "connected" or frame is None:
            return None
        interval = max(1.0 / self._fps if self._fps > 0 else 0.0, self._interval_hint)
        age = time.monotonic() - frame.t
        return age if age > max(STALLED_AFTER_S, 5.0 * interval) else None

    def stalled_s(self) -> float | None:
        """Seconds since a connected camera's last picture when it has stalled, else None."""
        with self._lock:
            return self._stalled_s(self._frame)

    def status(self) -> dict:
        with self._lock:
            frame = self._frame
            stalled = self._stalled_s(frame)
            steady = (stalled is None and self._still_since is not None and frame is not None
                      and frame.t - self._still_since >= STEADY_MIN_S)
            return {
                "state": "stalled" if stalled is not None else self._state,
                "source": self.source,
                "message": (f"no new picture for {stalled:.0f} s: the camera stopped answering"
                            if stalled is not None else self._message),
                "since": self._since,
                "frames": self._seq,
                "fps": round(self._fps, 1),
                "focus": None if frame is None or frame.focus is None else round(frame.focus, 2),
                "min_focus": self.min_focus,
                "sharp": None if frame is None or frame.focus is None else frame.focus >= self.min_focus,
                "steady": bool(steady),
                "scene": self._scene,
                "reconnects": self._reconnects,
                "unusable_frames": self._bad_frames,
                "next_retry_in_s": (None if self._next_retry_t is None
                                    else round(max(0.0, self._next_retry_t - time.time()), 1)),
            }

    def preview_jpeg(self, max_width: int = 960, quality: int = 75) -> tuple[int, bytes] | None:
        """The latest frame as a small JPEG, encoded once per frame whoever asks. None: no frame."""
        frame = self.latest()
        if frame is None or frame.rgb is None:
            return None
        with self._preview_lock:
            if self._preview is not None and self._preview[:2] == (frame.seq, max_width):
                return frame.seq, self._preview[2]
            rgb = frame.rgb
            h, w = rgb.shape[:2]
            if w > max_width:
                rgb = cv2.resize(rgb, (max_width, round(h * max_width / w)), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:  # pragma: no cover - encoding a valid uint8 image does not fail
                return None
            self._preview = (frame.seq, max_width, buf.tobytes())
            return frame.seq, self._preview[2]
