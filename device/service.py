"""The running service: camera feed, one field analysis at a time, records, and the page.

``serve()`` is what ``python -m device serve`` (``make demo``, the systemd unit) runs. It wires the
parts together and serves the Flask app with waitress. A missing or corrupt model does not stop the
service: the page and ``/api/status`` say the model is unusable, so an admin can see why, and captures
are refused until it is fixed. A bad config, or a bad ``settings.json`` of admin changes, is the one
start-up error that exits (status 78, EX_CONFIG, which the unit does not restart).

Faults while running: a camera frame that cannot be analysed is stored as a rejected field with the
reason; below ``LOW_DISK_FACTOR`` x ``service.min_free_disk_mb`` free, raw frames stop being saved (results
are kept); below ``min_free_disk_mb`` captures are refused (507), as they are when the disk fills up in
the middle of a write.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import sqlite3
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from device.analysis import AnalysisSettings, FieldResult, analyze_field, draw_annotation, near_threshold
from device.slide import SlideSummary, summarize_slide, threshold_text
from device.store import (
    Conflict,
    FieldImages,
    ModelInfo,
    NotFound,
    RecordsDamaged,
    SchemaTooNew,
    Store,
    StoreError,
    holds_data,
    is_damage,
    pending_migrations,
    sync_filesystem,
    write_atomic,
)

logger = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h; the systemd unit's RestartPreventExitStatus
MIGRATION_TIMEOUT_S = 30 * 60  # start time asked of systemd while an upgrade copies and migrates the records
WAITRESS_THREADS = 8  # captures wait for their analysis in a request thread; status and preview need others
# waitress keeps what a slow client has not read yet in memory up to outbuf_overflow, then in a temporary
# file, which on a full or read-only card breaks the reply half way (the records download is for exactly
# that card): keep it in memory, and hold the app back above the watermark (at most ~8 MB per client).
WAITRESS_SETTINGS = {"threads": WAITRESS_THREADS, "ident": "malaria-detect",
                     "outbuf_high_watermark": 4 * 1024 * 1024, "outbuf_overflow": 8 * 1024 * 1024}
MAX_PENDING_FIELDS = 2  # one analysing, one waiting; more is a double tap, refused with 503
REVIEW_CROP_MARGIN_FRAC = 0.3  # context around a flagged cell: the reviewer compares it with its neighbours
ANNOTATED_JPEG_QUALITY = 85
RAW_JPEG_QUALITY = 95
CROP_JPEG_QUALITY = 92  # small crops; parasite dots stay crisp at this quality
DEFAULT_WATCHDOG_INTERVAL_S = 10.0
# Below LOW_DISK_FACTOR x service.min_free_disk_mb of free space raw frames stop being saved (results are
# still kept); below min_free_disk_mb captures are refused. A raw frame is the largest file of a field.
LOW_DISK_FACTOR = 2
PLACEHOLDER_SIZE_PX = (640, 480)  # the "annotated image" of a field whose camera frame was unusable


BUSY_MESSAGE = "still analysing the previous fields: wait a moment"


class CaptureRefused(RuntimeError):
    """A capture that cannot be taken now; ``status`` is the HTTP status the page should get."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


# --- metrics -------------------------------------------------------------------------------------

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Counters and a latency histogram for ``/metrics`` (Prometheus text format)."""

    COUNTERS = {
        "fields_analysed_total": "Fields analysed (used or rejected).",
        "fields_rejected_total": "Fields rejected by the quality gate.",
        "cells_total": "Red cells counted in used fields.",
        "cells_flagged_total": "Cells flagged infected in used fields.",
        "analysis_errors_total": "Field analyses that failed with an error.",
        "uploads_refused_total": "Uploaded images refused (not an image, too large, undecodable).",
        "captures_refused_total": "Captures refused (no camera, model unusable, disk full, busy).",
        "camera_frames_unusable_total": "Fields captured from a camera frame that could not be analysed.",
        "raw_frames_skipped_total": "Fields stored without their raw frame because the disk was low.",
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum = 0.0
        self._latency_n = 0

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self._buckets[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self._latency_sum += seconds
            self._latency_n += 1

    def render(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """Prometheus text exposition; ``gauges`` maps name -> (help, value)."""
        lines = []
        with self._lock:
            for name, help_text in self.COUNTERS.items():
                lines += [f"# HELP malaria_{name} {help_text}", f"# TYPE malaria_{name} counter",
                          f"malaria_{name} {self.counts[name]}"]
            name = "malaria_analysis_latency_seconds"
            lines += [f"# HELP {name} Capture to stored field: analysis, images and commit.",
                      f"# TYPE {name} histogram"]
            cumulative = 0
            for le, n in zip((*LATENCY_BUCKETS_S, "+Inf"), self._buckets, strict=True):
                cumulative += n
                lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
            lines += [f"{name}_sum {self._latency_sum:.6f}", f"{name}_count {self._latency_n}"]
        for gname, (help_text, value) in (gauges or {}).items():
            lines += [f"# HELP malaria_{gname} {help_text}", f"# TYPE malaria_{gname} gauge",
                      f"malaria_{gname} {_sample_value(value)}"]
        return "\n".join(lines) + "\n"


def _sample_value(value: float) -> str:
    """A gauge's value in full: an integer as it is, a float by its shortest exact form (``{:g}`` kept 6
    significant digits, so 31 GB free read 3.1e+10 and an uptime of 1,234,567 s read 1.23457e+06)."""
    if isinstance(value, int | bool) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


# --- the analyser ---------------------------------------------------------------------------------

CARD_METRICS = ("n", "accuracy", "sensitivity", "specificity", "false_positive_rate", "auc")


@dataclass(frozen=True)
class ModelStatus:
    ok: bool
    name: str = ""
    sha256: str = ""
    threshold: float = 0.0
    card_threshold: float = 0.0
    fp_rate_per_cell: float = 0.0
    runtime: str = ""
    error: str | None = None
    card_date: str = ""
    card_metrics: dict = field(default_factory=dict)  # validation-patient figures at the card threshold
    threshold_rule: str = ""  # how the card's threshold was chosen, and on which cells
    views: tuple[str, ...] = ("as it is",)  # the flips of each cell the model averages (convert --views)
    members: int = 1  # the trained models whose mean logit the model gives (convert --model A B ...)

    def to_json(self) -> dict:
        return {"ok": self.ok, "name": self.name, "sha256": self.sha256, "threshold": self.threshold,
                "card_threshold": self.card_threshold, "fp_rate_per_cell": self.fp_rate_per_cell,
                "runtime": self.runtime, "error": self.error, "card_date": self.card_date,
                "card_metrics": self.card_metrics, "threshold_rule": self.threshold_rule, "views": list(self.views),
                "members": self.members}


def _card_metrics(card) -> dict:
    """The card's validation figures at its threshold; NaN (no positives) becomes None: JSON has no NaN."""
    data = getattr(card, "data", None) or {}
    m = (data.get("metrics") or {}).get("int8_at_threshold") or {}
    out = {}
    for k in CARD_METRICS:
        v = m.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v) if math.isfinite(v) else None
    return out


def _card_views(card_data: dict) -> tuple[str, ...]:
    """The flips of each cell the model averages inside itself, as its card lists them (a card from before
    `convert --views`, or one without the entry, is one view)."""
    entry = card_data.get("views")
    views = entry.get("views") if isinstance(entry, dict) else None
    if isinstance(views, list) and views and all(isinstance(v, str) for v in views):
        return tuple(views)
    return ("as it is",)


def _card_members(card_data: dict) -> int:
    """How many trained models the model averages inside itself, as its card says (a card from before
    ensembles, or one without the entry, is one model)."""
    entry = card_data.get("members")
    count = entry.get("count") if isinstance(entry, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 1 else 1


# --- disk space ----------------------------------------------------------------------------------

def free_disk_mb(path: str | Path) -> float:
    """Free space on the file system holding ``path``, in MB: the one probe every check uses."""
    return shutil.disk_usage(path).free / 1e6


@dataclass(frozen=True)
class DiskState:
    """Free space against the two levels: ``low`` (raw frames stop) and ``min`` (captures refused)."""

    free_mb: float
    low_mb: float
    min_mb: float

    @property
    def level(self) -> str:
        if self.free_mb < self.min_mb:
            return "full"
        if self.free_mb < self.low_mb:
            return "low"
        return "ok"

    @property
    def message(self) -> str | None:
        """What the page says, or None when there is room."""
        if self.level == "full":
            return (f"The disk is nearly full ({self.free_mb:.0f} MB free, {self.min_mb:.0f} MB needed): new fields "
                    "are refused. An admin can free space on the admin page (Free space).")
        if self.level == "low":
            return (f"Disk space is low ({self.free_mb:.0f} MB free): raw frames are no longer saved; results and "
                    "annotated fields still are. An admin can free space on the admin page (Free space).")
        return None

    def to_json(self) -> dict:
        return {"free_mb": round(self.free_mb), "low_mb": round(self.low_mb), "min_free_mb": round(self.min_mb),
                "level": self.level, "low": self.level != "ok", "full": self.level == "full",
                "message": self.message}


REVIEW_MARK_RGB = (255, 214, 0)  # the corner marks around the judged cell: yellow, unlike any stain


def review_crop(rgb: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """The cell (flagged, or near the threshold) with some of its surroundings, unmasked: what a reviewer
    needs to judge it. The cell stays in the middle (black beyond the frame's edge) and four corner marks
    just outside its box say which cell is judged: a cell at the frame's edge sat off centre beside whole
    neighbours, and one confirmation of a neighbour's parasite makes a slide positive. Nothing is drawn
    over the cell itself."""
    x, y, w, h = bbox
    m = round(max(w, h) * REVIEW_CROP_MARGIN_FRAC)
    hh, ww = rgb.shape[:2]
    x0, y0, x1, y1 = x - m, y - m, x + w + m, y + h + m
    out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(ww, x1), min(hh, y1)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    gap = max(2, round(0.08 * max(w, h)))  # off the cell's outline
    arm = max(4, round(0.25 * max(w, h)))
    t = max(2, round(0.04 * max(w, h)))
    bx0, by0, bx1, by1 = m - gap, m - gap, m + w - 1 + gap, m + h - 1 + gap
    for cx, cy, dx, dy in ((bx0, by0, 1, 1), (bx1, by0, -1, 1), (bx0, by1, 1, -1), (bx1, by1, -1, -1)):
        cv2.line(out, (cx, cy), (cx + dx * arm, cy), REVIEW_MARK_RGB, t)
        cv2.line(out, (cx, cy), (cx, cy + dy * arm), REVIEW_MARK_RGB, t)
    return out


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    return _imencode_jpeg(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), quality)


def _imencode_jpeg(bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def placeholder_rgb(text: str = "NO USABLE PICTURE") -> np.ndarray:
    """A gray image standing in for a camera frame that could not be used."""
    w, h = PLACEHOLDER_SIZE_PX
    img = np.full((h, w, 3), 90, np.uint8)
    cv2.putText(img, text, (30, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.1, (230, 230, 230), 2)
    return img


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def _read_only(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.EROFS
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY
                or "readonly database" in str(exc))
    return False


RECORDS_DAMAGED_MESSAGE = ("the device's records are damaged (a failing SD card): nothing more is saved to "
                           "them; an admin must copy the data folder off the card, then restore the last backup "
                           "onto a new card (systemd/README.md, Back up and restore)")


def storage_problem(exc: BaseException) -> str | None:
    """What a technician or admin is told when a write failed for want of storage, or when the records
    are damaged, or None."""
    if isinstance(exc, RecordsDamaged) or is_damage(exc):
        return RECORDS_DAMAGED_MESSAGE
    if _disk_full(exc):
        return ("the device's storage is full: nothing was saved; an admin can free space on the admin page "
                "(Free space)")
    if _read_only(exc):
        return ("the device's storage has become read-only (a failing SD card or a remount): nothing was "
                "saved; an admin can download the records (admin page, Backup), then check the card")
    return None


def storage_writable(store: Store) -> str | None:
    """None when the data folder and database can be written, else why not (for /healthz)."""
    for path in (store.data_dir, store.db_path):
        if path.exists() and not os.access(path, os.W_OK):
            return f"storage read-only: {path} cannot be written"
    return None


def free_raw_frames(store: Store, finished_before: datetime | None) -> dict:
    """Delete the raw frames of slides finished before that time, or of every finished slide (None)
    (:meth:`Store.delete_images`).

    First what an interrupted earlier run left is swept. Then the flagged cells' crops of those fields are
    made durable: a crop a power cut lost is cut again from its raw frame while that still exists, and
    one ``syncfs`` puts every crop on the card (they are written without an fsync while their raw frame
    is kept; one fsync each took 10 s for 30,000 crops). When that reports a write error (a failing card)
    nothing is deleted: OSError. Returns ``{"fields", "bytes", "failed", "crops_recut", "swept"}``.
    """
    swept = store.sweep_images("raw")  # what an earlier run cut short left: no row names those files
    field_ids = store.image_fields("raw", finished_before)
    recut = 0
    for cell_id, path in store.crop_files(field_ids):
        if not holds_data(path) and ensure_crop(store, cell_id) is not None:
            recut += 1
    if field_ids:
        sync_filesystem(store.images_dir)  # raises on a write error: the raw frames then stay
    freed = store.delete_images("raw", field_ids)
    return {**freed, "bytes": freed["bytes"] + swept["bytes"], "failed": freed["failed"] + swept["failed"],
            "crops_recut": recut, "swept": swept["files"]}


def free_annotated_images(store: Store, finished_before: datetime | None) -> dict:
    """Delete the annotated images of the fields of slides finished before that time; each field's result,
    cell list (with every box) and review crops stay. Nothing is cut from an annotated image, so
    nothing needs to be made durable first. Returns ``{"fields", "bytes", "failed", "swept"}``."""
    swept = store.sweep_images("annotated")
    freed = store.delete_images("annotated", store.image_fields("annotated", finished_before))
    return {**freed, "bytes": freed["bytes"] + swept["bytes"], "failed": freed["failed"] + swept["failed"],
            "swept": swept["files"]}


def ensure_crop(store: Store, cell_id: int) -> Path | None:
    """The crop file of a cell for review (flagged, or near the threshold), cut again from the raw frame if a
    power cut lost it."""
    path = store.cell_crop_path(cell_id)
    if path is None:
        return None
    if holds_data(path):
        return path
    cell = store.get_cell(cell_id)
    raw = store.field_image_path(cell["field_id"], "raw") if cell else None
    if cell is None or raw is None:
        return None
    from device.imageio import ImageError, read_rgb

    try:
        rgb = read_rgb(raw)
    except ImageError:
        return None
    bbox = (cell["x"], cell["y"], cell["w"], cell["h"])
    write_atomic(path, encode_jpeg(review_crop(rgb, bbox), CROP_JPEG_QUALITY))
    logger.warning("cell %d: crop was missing, cut again from the raw frame", cell_id)
    return path


class FieldAnalyser:
    """Analyses captured fields one at a time in a worker thread and records them.

    Args:
        store: where fields are recorded.
        classifier: a loaded ``CellClassifier`` (or anything with its interface), or None when the model
            is unusable; then ``model_error`` says why and every capture is refused.
        settings: the quality gate and threshold for :func:`device.analysis.analyze_field`.
        save_raw: keep the unannotated frame too (JPEG quality 95) while the disk has room.
        min_free_disk_mb: refuse captures below this much free space in the data folder; below
            ``LOW_DISK_FACTOR`` times it, raw frames are no longer saved.
    """

    def __init__(self, store: Store, classifier=None, *, settings: AnalysisSettings | None = None,
                 model_error: str | None = None, save_raw: bool = True, min_free_disk_mb: int = 0,
                 metrics: Metrics | None = None, max_pending: int = MAX_PENDING_FIELDS):
        self.store = store
        self.classifier = classifier
        self.settings = settings or AnalysisSettings()
        self.save_raw = save_raw
        self.min_free_disk_mb = min_free_disk_mb
        self.metrics = metrics or Metrics()
        self.max_pending = max_pending
        self._pending_by_slide: dict[int, int] = {}  # fields being analysed, per slide (Finish waits for its own)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis")
        self._raw_skipped_logged = False
        self.last_latency_s: float | None = None
        if classifier is None:
            self.model = ModelStatus(False, error=model_error or "no model loaded")
        else:
            self.model = self._status(self.settings.threshold if self.settings.threshold is not None
                                      else classifier.threshold)

    def _status(self, threshold: float | None) -> ModelStatus:
        """The loaded model's status at this operating threshold (None: the card's): unusable when the card
        gives no false-positive rate there, since no slide call could be made."""
        classifier = self.classifier
        card = getattr(classifier, "card", None)
        t = float(threshold if threshold is not None else getattr(card, "threshold", classifier.threshold))
        fp = _call_fp_rate(card, t)
        if fp is None and card is not None:
            return ModelStatus(False, error=_no_fp_rate(card, t))
        card_data = getattr(card, "data", None) or {}
        return ModelStatus(
            True, name=getattr(card, "name", "model"), sha256=getattr(classifier, "sha256", ""),
            threshold=t, card_threshold=float(getattr(card, "threshold", classifier.threshold)),
            fp_rate_per_cell=float(fp or 0.0), runtime=getattr(classifier, "runtime", ""),
            card_date=str(card_data.get("date", "")), card_metrics=_card_metrics(card),
            threshold_rule=str(card_data.get("threshold_rule", "")), views=_card_views(card_data),
            members=_card_members(card_data))

    @classmethod
    def from_config(cls, cfg, store: Store, metrics: Metrics | None = None) -> FieldAnalyser:
        """Load the model named by the config; a model that cannot be used is logged, not raised."""
        from device.classifier import CellClassifier
        from device.model_card import ModelError

        settings = AnalysisSettings(min_focus=cfg.analysis.min_focus,
                                    min_cells_per_field=cfg.analysis.min_cells_per_field,
                                    threshold=cfg.model.threshold)
        common = {"settings": settings, "save_raw": cfg.service.save_raw_frames,
                  "min_free_disk_mb": cfg.service.min_free_disk_mb, "metrics": metrics}
        try:
            clf = CellClassifier(cfg.model.path, threads=cfg.model.threads, threshold=cfg.model.threshold)
        except ModelError as exc:
            logger.error("MODEL UNUSABLE, captures are refused until it is fixed: %s", exc)
            return cls(store, None, model_error=str(exc), **common)
        return cls(store, clf, **common)

    def set_threshold(self, threshold: float | None) -> None:
        """The operating threshold for slides started from now on (None: the model card's).

        An open slide keeps the threshold it was started with: its fields are classified with it.
        """
        if self.classifier is not None:  # also when unusable at the old threshold: the new one may do
            status = self._status(threshold)
            if not status.ok and self.model.ok:
                raise ValueError(status.error)  # nothing applied: the admin page refuses it first
            self.model = status
        self.settings = replace(self.settings, threshold=threshold)

    def threshold_problem(self, threshold: float | None) -> str | None:
        """Why no slide call could be made at this operating threshold (None: the card's), or None."""
        if self.classifier is None:
            return None  # no model: the page says that already
        status = self._status(threshold)
        return None if status.ok else status.error

    def model_info(self) -> ModelInfo:
        if not self.model.ok:
            raise CaptureRefused(f"the model is unusable: {self.model.error}", 503)
        return ModelInfo(self.model.name, self.model.sha256, self.model.threshold, self.model.fp_rate_per_cell)

    @property
    def busy(self) -> bool:
        return self.pending > 0

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._pending_by_slide.values())

    def disk(self) -> DiskState:
        m = float(self.min_free_disk_mb)
        return DiskState(free_disk_mb(self.store.data_dir), low_mb=m * LOW_DISK_FACTOR, min_mb=m)

    def check_disk(self) -> DiskState:
        disk = self.disk()
        if disk.level == "full":
            raise CaptureRefused(f"the disk is nearly full ({disk.free_mb:.0f} MB free, {disk.min_mb:.0f} MB "
                                 "needed): an admin can free space on the admin page (Free space)", 507)
        return disk

    def refused(self, exc: CaptureRefused) -> CaptureRefused:
        """Count a refusal for /metrics; returns it for ``raise``."""
        self.metrics.inc("captures_refused_total")
        return exc

    def submit(self, slide_id: int, rgb: np.ndarray | None, source: str = "camera", *,
               problem: str | None = None, view_png: bytes | None = None,
               shown_size: tuple[int, int] | None = None) -> Future:
        """Queue one field; the future's result is the stored field row (dict).

        ``shown_size``: the picture's (width, height) when ``rgb`` was decoded reduced from it (a large
        uploaded JPEG): a rejection names sizes on the picture. The field is stored as analysed.

        ``view_png``: the camera view it was captured from, stored with a counted field so that the
        view stays "already counted" after a restart.

        ``problem`` (with ``rgb`` None) says why the camera frame cannot be analysed: the field is stored
        as rejected with that reason, so the technician sees it in the slide's list.

        Raises :class:`CaptureRefused` at once when the model is unusable, the disk full or the queue
        full; the future raises ``NotFound``/``Conflict`` for a missing or finished slide, and
        :class:`CaptureRefused` (507) when the disk fills up while the field is written.
        """
        try:
            model = self.model_info()
            self.check_disk()
            if self.store.damage:  # before the analysis and the images: the row could not be written
                raise CaptureRefused(RECORDS_DAMAGED_MESSAGE, 507)
        except CaptureRefused as exc:
            raise self.refused(exc) from None
        slide = self.store.get_slide(slide_id)
        if slide is None:
            raise NotFound(f"slide {slide_id} not found")
        Store._check_open(slide, model.sha256)
        with self._lock:
            if self._full():
                raise self.refused(CaptureRefused(BUSY_MESSAGE, 503))
            self._pending_by_slide[slide_id] = self._pending_by_slide.get(slide_id, 0) + 1
        t0 = time.perf_counter()
        # The slide's own threshold: an admin may change the threshold while the slide is open.
        threshold = float(slide["threshold"])
        # cells scored from the slide's review floor (below its threshold, or None) up keep a crop for review too
        crop_floor = slide.get("review_floor")
        once = threading.Lock()

        def release() -> None:  # exactly once per field, whichever path gets there first
            if once.acquire(blocking=False):
                self._release(slide_id)
        try:
            fut = self._executor.submit(self._process, release, slide_id, rgb, source, model, threshold, problem,
                                        t0, view_png, crop_floor, shown_size)
        except RuntimeError:  # shut down (or its thread could not start: the item may still run later)
            release()
            raise CaptureRefused("the service is stopping", 503) from None
        # A field that ran is released by _process before its result is set, so a client acting on the answer
        # (Finish, the next capture) never finds it still pending; one cancelled before it ran is released here.
        fut.add_done_callback(lambda f: release() if f.cancelled() else None)
        return fut

    def _release(self, slide_id: int) -> None:
        """One field of the slide is no longer in flight (stored, failed or cancelled)."""
        with self._lock:
            left = self._pending_by_slide.get(slide_id, 1) - 1
            if left > 0:
                self._pending_by_slide[slide_id] = left
            else:
                self._pending_by_slide.pop(slide_id, None)

    def pending_for(self, slide_id: int) -> int:
        """Fields of this slide still being analysed."""
        with self._lock:
            return self._pending_by_slide.get(slide_id, 0)

    def _process(self, release: Callable[[], None], *args) -> dict:
        """Counted and logged here, in the worker, before the page gets its answer."""
        try:
            return self._analyse_and_store(*args)
        except CaptureRefused:
            self.metrics.inc("captures_refused_total")
            raise
        except (NotFound, Conflict) as exc:
            # The page may have had its 202 already: say in the log that this field was not recorded.
            logger.warning("field of slide %s not recorded: %s", args[0], exc)
            raise
        except Exception:
            self.metrics.inc("analysis_errors_total")
            logger.exception("field analysis failed")
            raise
        finally:
            release()

    def _analyse_and_store(self, slide_id: int, rgb: np.ndarray | None, source: str, model: ModelInfo,
                           threshold: float, problem: str | None, t0: float, view_png: bytes | None = None,
                           crop_floor: float | None = None, shown_size: tuple[int, int] | None = None) -> dict:
        if rgb is None or problem:
            h, w = (rgb.shape[:2] if isinstance(rgb, np.ndarray) and rgb.ndim >= 2 else (0, 0))
            result = FieldResult(int(w), int(h), f"camera frame unusable: {problem or 'no picture'}", [], 0.0,
                                 threshold, {})
            images = FieldImages(encode_jpeg(placeholder_rgb(), ANNOTATED_JPEG_QUALITY), None, {})
            self.metrics.inc("camera_frames_unusable_total")
        else:
            result = analyze_field(rgb, self.classifier, replace(self.settings, threshold=threshold),
                                   shown_size=shown_size)
            images = self.encode_images(rgb, result, save_raw=self._keep_raw(), crop_floor=crop_floor)
        try:
            field_id = self.store.add_field(slide_id, result, source=source, model_sha256=model.sha256,
                                            images=images, view_png=view_png)
        except (OSError, sqlite3.Error, RecordsDamaged) as exc:
            if isinstance(exc, RecordsDamaged) or is_damage(exc):
                logger.error("slide %d: the records are damaged; the field was not saved: %s", slide_id, exc)
                raise CaptureRefused(RECORDS_DAMAGED_MESSAGE, 507) from exc
            if _disk_full(exc):
                logger.error("slide %d: the disk filled up while a field was written: %s", slide_id, exc)
                raise CaptureRefused("the disk is full: the field was not saved; an admin can free space on the "
                                     "admin page (Free space)", 507) from exc
            if _read_only(exc):
                logger.error("slide %d: storage read-only while a field was written: %s", slide_id, exc)
                raise CaptureRefused(storage_problem(exc) or str(exc), 507) from exc
            raise
        latency = time.perf_counter() - t0
        self.last_latency_s = latency
        m = self.metrics
        m.observe_latency(latency)
        m.inc("fields_analysed_total")
        if result.rejected:
            m.inc("fields_rejected_total")
        m.inc("cells_total", result.rbc_count)
        m.inc("cells_flagged_total", result.infected_count)
        logger.info("slide %d field %d: %s (%.0f ms)", slide_id, field_id,
                    f"rejected: {result.rejected}" if result.rejected
                    else f"{result.infected_count}/{result.rbc_count} flagged", latency * 1000)
        return self.store.get_field(field_id)  # type: ignore[return-value]

    def _full(self) -> bool:
        return sum(self._pending_by_slide.values()) >= self.max_pending

    def full(self) -> bool:
        """As many fields are being analysed as may be: :meth:`submit` would refuse another (503). An upload
        asks before it is decoded, so that refused uploads take no memory."""
        with self._lock:
            return self._full()

    def _keep_raw(self) -> bool:
        """Raw frames are kept only while the disk is above the low level (the first thing to give up)."""
        if not self.save_raw:
            return False
        disk = self.disk()
        if disk.level == "ok":
            if self._raw_skipped_logged:
                logger.info("disk space recovered (%.0f MB free): raw frames are saved again", disk.free_mb)
                self._raw_skipped_logged = False
            return True
        self.metrics.inc("raw_frames_skipped_total")
        if not self._raw_skipped_logged:
            logger.warning("disk space low (%.0f MB free, below %.0f MB): raw frames are no longer saved",
                           disk.free_mb, disk.low_mb)
            self._raw_skipped_logged = True
        return False

    def encode_images(self, rgb: np.ndarray, result: FieldResult, *, save_raw: bool | None = None,
                      crop_floor: float | None = None) -> FieldImages:
        """The field's images: annotated (the cells scored from ``crop_floor`` up and not flagged boxed in
        amber), raw (``save_raw``) and a crop of each cell a person reviews, the flagged ones and those scored
        from ``crop_floor`` up (the slide's review floor; None: flagged only)."""
        save_raw = self.save_raw if save_raw is None else save_raw
        crops = {} if result.rejected else {
            i: encode_jpeg(review_crop(rgb, c.bbox), CROP_JPEG_QUALITY)
            for i, c in enumerate(result.cells)
            if c.infected or near_threshold(c, crop_floor)}
        # One full-frame copy, in the encoder's BGR order: the raw frame is encoded from it, then the boxes
        # are drawn into it. (A copy to draw on and one per encoding made three: a 50 MP upload took the
        # service from 145 to 718 MB, past the unit's MemoryMax, and was lost.) The caller's frame is not
        # touched.
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        raw = _imencode_jpeg(bgr, RAW_JPEG_QUALITY) if save_raw else None
        annotated = _imencode_jpeg(draw_annotation(bgr, result, near_from=crop_floor, bgr=True),
                                   ANNOTATED_JPEG_QUALITY)
        return FieldImages(annotated_jpeg=annotated, raw_jpeg=raw, crops_jpeg=crops)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


# --- slide results --------------------------------------------------------------------------------

def _call_fp_rate(card, threshold: float) -> float | None:
    """The card's false-positive rate per healthy cell at this threshold (the slide call needs it)."""
    if card is None:
        return None
    at = getattr(card, "false_positive_rate_at", None)
    if at is not None:
        # None when the card's curve does not reach this threshold: the card's own rate belongs to its
        # own threshold only, and a lower threshold flags more healthy cells
        return at(threshold)
    return getattr(card, "false_positive_rate", None)


def _no_fp_rate(card, threshold: float) -> str:
    curve = [r["threshold"] for r in (getattr(card, "data", {}) or {}).get("operating_curve") or []]
    reach = f"its operating curve starts at {min(curve):g}" if curve else "it has no operating curve"
    return (f"the model card gives no false-positive rate at threshold {threshold_text(threshold)} ({reach}), "
            f"so no slide call could be made: set a threshold the curve covers, or none for the card's "
            f"{threshold_text(card.threshold)}")


def confirmed_parasites(totals: dict) -> int:
    """Cells a person confirmed as parasites: flagged ones and ones near the threshold."""
    return totals.get("review", {}).get("confirmed", 0) + totals.get("near", {}).get("confirmed", 0)


def review_is_final(totals: dict) -> bool:
    """Whether the result after review stands on its own: a parasite confirmed by a person (a flagged
    cell or one near the threshold), or every flagged cell reviewed. Until then the result after review
    is the automatic one. Cells near the threshold left unreviewed do not hold it back: they were never
    in the count."""
    review = totals.get("review", {})
    return confirmed_parasites(totals) > 0 or (review.get("pending", 1) == 0
                                               and review.get("rejected", 0) > 0)


def slide_summary(slide: dict, totals: dict, *, reviewed: bool = False) -> SlideSummary:
    """The slide's result from its counts: automatic, or after the technician's review.

    After review, a confirmed parasite makes the call positive. Otherwise the result after review is
    the automatic one until every flagged cell has been reviewed: the cells rejected so far were
    false positives already inside the allowance, so leaving them out early would let a positive
    slide read negative after a few rejections. With every flagged cell rejected, none is left to
    call, and the detection limit stays the automatic one (a review of the flagged cells cannot find the
    parasites the model missed). A cell near the threshold confirmed by review is a parasite found: it
    joins the count after review and makes the call positive.
    """
    review = totals.get("review", {})
    final = reviewed and review_is_final(totals)

    def summary(infected: int, confirmed: int) -> SlideSummary:
        return summarize_slide(totals["rbc_count"], infected, threshold=slide["threshold"],
                               fp_rate_per_cell=slide["fp_rate_per_cell"], target_rbc=slide["target_rbc"],
                               rbc_per_ul=slide["rbc_per_ul"], fields_used=totals["fields_used"],
                               fields_rejected=totals["fields_rejected"], confirmed_count=confirmed)

    # the counts after review always leave out the rejected cells; only the call waits for the review
    s = summary(totals["reviewed_infected_count"] if reviewed else totals["infected_count"],
                confirmed_parasites(totals) if final else 0)
    if reviewed and not final and review.get("pending", 0) > 0:
        auto = summary(totals["infected_count"], 0)
        s = replace(s, call=auto.call, call_reason=(
            f"review in progress ({review['pending']} of {totals['infected_count']} flagged cells to review): "
            f"the automatic call stands; {auto.call_reason}"))
    near = totals.get("near", {})
    if final and near.get("confirmed", 0):
        n_conf = confirmed_parasites(totals)
        s = replace(s, call_reason=(
            f"{n_conf} cell{'s' if n_conf != 1 else ''} confirmed as {'parasites' if n_conf != 1 else 'a parasite'}"
            f" by review ({review.get('confirmed', 0)} flagged, {near['confirmed']} near the threshold; "
            f"{s.rbc_count} red cells counted)" + (
                # the model flagged none of them: one healthy cell confirmed by mistake makes this call
                "; the model flagged none of them: confirm on the slide under the microscope"
                if not review.get("confirmed", 0) else "")))
    if final and not confirmed_parasites(totals) and s.call == "negative":
        unseen = near.get("pending", 0)
        s = replace(s, call_reason=f"all {totals['infected_count']} flagged cells rejected on review; "
                                   f"{s.rbc_count} red cells counted" + (
                                       f"; {unseen} cell{'s' if unseen != 1 else ''} near the threshold not "
                                       "reviewed" if unseen else ""))
    # summarize_slide calls any given count "measured"; the configured one is a population assumption.
    return s if slide["rbc_per_ul_measured"] else replace(s, rbc_per_ul_source="assumed")


def finish_slide(store: Store, slide_id: int) -> dict:
    """Close a slide, storing the automatic result with the model it was made with.

    The result is made from the counts inside the transaction that closes the slide.
    """
    def result(slide: dict, totals: dict) -> dict:
        if not totals["fields"]:  # checked in the closing transaction: a capture may have failed meanwhile
            raise Conflict(f"slide {slide['sample_id']} has no fields yet: capture fields before finishing")
        return {"automatic": slide_summary(slide, totals).to_json(), "model_name": slide["model_name"],
                "model_sha256": slide["model_sha256"], "threshold": slide["threshold"]}

    return store.finish_slide(slide_id, result)


# --- settings changed on the admin page -------------------------------------------------------------

SETTINGS_FILE = "settings.json"
# What an admin may change on the page, by config section; everything else comes from the config file.
ADMIN_SETTINGS: dict[str, tuple[str, ...]] = {
    "analysis": ("counting_target_rbc",),
    "model": ("threshold",),
    "camera": ("source", "device"),
    "security": ("technician_pin", "admin_password_hash"),
}


class SettingsNotSaved(RuntimeError):
    """settings.json could not be written (full disk, read-only data folder); nothing was applied."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class AdminSettings:
    """Settings changed on the admin page, kept in ``data_dir/settings.json`` (mode 0600) over the config.

    Under systemd the config file and the code are read-only (/etc, /opt); the data folder is the one
    place the service writes. At start-up the file is applied over the config and validated the same
    way (:meth:`device.config.Config.with_changes`): a bad file stops the service like a bad config,
    naming the file and the key. It may hold the admin password hash and the PIN, hence 0600.
    """

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / SETTINGS_FILE
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        """The stored changes by section ({} without a file). Raises ConfigError naming the file and key."""
        from device.config import ConfigError, read_utf8

        text = read_utf8(self.path, "settings", missing_ok=True)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: expected an object of sections")
        for section, values in data.items():
            if section not in ADMIN_SETTINGS or not isinstance(values, dict):
                raise ConfigError(f"{self.path}: {section}: not a section of admin settings "
                                  f"({', '.join(ADMIN_SETTINGS)})")
            for key in values:
                if key not in ADMIN_SETTINGS[section]:
                    raise ConfigError(f"{self.path}: {section}.{key}: not a setting the admin page changes")
        return data

    def apply(self, cfg):
        """``cfg`` with the stored changes applied and validated. Raises ConfigError naming file and key."""
        from device.config import ConfigError

        for section, values in self.load().items():
            try:
                cfg = cfg.with_changes(section, **values)
            except ConfigError as exc:
                raise ConfigError(f"{self.path}: {exc}") from exc
        return cfg

    def update(self, holder, changes: dict[str, dict], after: Callable | None = None):
        """Apply ``changes`` to the live config ``holder.config`` and keep them with the earlier ones.

        Under one lock: the live config is read, the changes validated over it, the file written, the new
        config assigned and ``after(new_config)`` run (the threshold, the camera). Two admins saving at once
        (a password change beside a settings change) therefore both keep their change: validated over a copy
        read before the lock, the later assignment took the earlier change out of the running service (an old
        password working again) while the file held both. Returns the new config.

        Raises ConfigError (``section.key: problem``) and writes nothing when a value is refused;
        SettingsNotSaved when the file cannot be written (nothing applied).
        """
        with self._lock:
            cfg = holder.config
            stored = self.load()
            for section, values in changes.items():
                unknown = set(values) - set(ADMIN_SETTINGS.get(section, ()))
                if unknown:
                    raise ValueError(f"not admin settings: {section}.{', '.join(sorted(unknown))}")
                cfg = cfg.with_changes(section, **values)
                stored.setdefault(section, {}).update(values)
            try:
                write_atomic(self.path, (json.dumps(stored, indent=2, sort_keys=True) + "\n").encode())
            except OSError as exc:
                raise SettingsNotSaved(f"Not saved: cannot write {self.path} ({exc.strerror or exc})",
                                       507 if _disk_full(exc) else 500) from exc
            holder.config = cfg
            if after is not None:
                after(cfg)
        return cfg


# --- serve ---------------------------------------------------------------------------------------

class Watchdog:
    """Sends WATCHDOG=1 to systemd every half watchdog period while ``healthy()`` is true."""

    def __init__(self, notifier, healthy, interval_s: float, status=None):
        self.notifier, self.healthy, self.interval_s, self.status = notifier, healthy, interval_s, status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._last_status = None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.healthy():
                self.notifier.notify("WATCHDOG=1")
            else:
                logger.error("capture loop is not turning: withholding the watchdog ping")
            if self.status is not None:
                text = self.status()
                if text != self._last_status:
                    self.notifier.notify(f"STATUS={text}")
                    self._last_status = text
            self._stop.wait(self.interval_s)


def watchdog_interval_s() -> float:
    """Half the systemd watchdog period (WATCHDOG_USEC), or a default when it is not set."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if usec.isascii() and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
        return int(usec) / 1e6 / 2
    return DEFAULT_WATCHDOG_INTERVAL_S


def camera_opener(camera_config):
    """What the camera feed calls to (re)open the camera that ``camera_config`` names."""
    from device.camera import open_camera

    return partial(open_camera, camera_config)


def _set_log_level(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(level.upper())


def serve(config_path: str | None, host: str | None = None, port: int | None = None) -> int:
    """Run the service until SIGTERM/SIGINT. Returns the exit status (0 after a clean stop).

    Returns 78 (EX_CONFIG) for an invalid config or records made by a newer version (systemd does not
    restart it), and 1 when the database or the port cannot be used.
    """
    import sdnotify
    import waitress

    from device.camera import CameraFeed
    from device.config import ConfigError, load_config
    from device.web import create_app
    from device.web.health import install_recent_log

    try:
        cfg = load_config(config_path)
        overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        if overrides:
            cfg = cfg.with_changes("service", **overrides)
        cfg = AdminSettings(cfg.service.data_dir).apply(cfg)
    except ConfigError as exc:
        logger.error("config error: %s", exc)
        return EX_CONFIG
    _set_log_level(cfg.service.log_level)
    install_recent_log()  # the admin page's "last problems", from here on
    notifier = sdnotify.SystemdNotifier()
    migrations = pending_migrations(cfg.service.data_dir)
    if migrations and os.environ.get("NOTIFY_SOCKET"):
        # An upgrade copies the records, then migrates them, before the service is ready: minutes on an SD
        # card with years of records, past the unit's start timeout (which would kill it and start over).
        notifier.notify(f"EXTEND_TIMEOUT_USEC={MIGRATION_TIMEOUT_S * 1_000_000}")
        notifier.notify(f"STATUS=copying and migrating the records ({migrations} schema change(s))")
    try:
        store = Store(cfg.service.data_dir)
    except SchemaTooNew as exc:  # older software installed over newer records: not worth restarting
        logger.error("cannot open the records in %s: %s", cfg.service.data_dir, exc)
        return EX_CONFIG
    except (StoreError, OSError) as exc:
        logger.error("cannot open the records in %s: %s", cfg.service.data_dir, exc)
        return 1
    # every page of the records, read while the service already works (Store.check_integrity)
    threading.Thread(target=store.check_integrity, name="records-check", daemon=True).start()
    metrics = Metrics()
    analyser = FieldAnalyser.from_config(cfg, store, metrics)
    feed = CameraFeed(camera_opener(cfg.camera), reconnect_max_s=cfg.camera.reconnect_max_s,
                      min_focus=cfg.analysis.min_focus, source=cfg.camera.source)
    feed.start()
    try:
        app = create_app(cfg, store, feed, analyser)
        server = waitress.create_server(app, host=cfg.service.host, port=cfg.service.port, **WAITRESS_SETTINGS)
    except OSError as exc:
        logger.error("cannot serve on %s:%d: %s", cfg.service.host, cfg.service.port, exc)
        feed.stop()
        analyser.shutdown(wait=False)
        store.close()
        return 1

    watchdog = None
    if os.environ.get("NOTIFY_SOCKET"):
        def status_line() -> str:
            cam = feed.status()["state"]
            return f"camera {cam}; model {'ok' if analyser.model.ok else 'UNUSABLE'}"
        watchdog = Watchdog(notifier, feed.loop_healthy, watchdog_interval_s(), status_line).start()
    previous_sigterm = None
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def _terminate(signum, frame):
            if stopping.is_set():
                return  # stopping already: let the clean-up finish
            stopping.set()
            raise SystemExit(0)  # waitress's run() catches it and stops its worker threads
        previous_sigterm = signal.signal(signal.SIGTERM, _terminate)
    # From here a SIGTERM is a SystemExit anywhere, and the clean-up below runs.
    try:
        logger.info("Malaria Detect serving on http://%s:%s/ (camera %s, model %s, data %s)",
                    cfg.service.host, server.effective_port, cfg.camera.source,
                    analyser.model.name if analyser.model.ok else "UNUSABLE", store.data_dir)
        notifier.notify("READY=1")
        if stopping.is_set():
            # sdnotify swallows every exception, a SIGTERM's SystemExit during READY=1 too: the stop the
            # service manager sends right after READY was lost, and the process ran on
            raise SystemExit(0)
        server.run()
    finally:
        notifier.notify("STOPPING=1")
        logger.info("stopping")
        if watchdog is not None:
            watchdog.stop()
        feed.stop()
        analyser.shutdown(wait=True)
        server.close()
        store.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return 0
