"""What the HTML pages and the JSON API share: request parsing, capture, and row -> JSON shapes."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flask import abort, g, request, url_for
from werkzeug.exceptions import HTTPException

from device.camera import (
    decode_view,
    encode_view,
    prepare_view,
    prepared_overlap,
    same_view,
    thumbnail,
    turned_views,
    view_blurred,
)
from device.config import RBC_PER_UL_RANGE, review_floor_at
from device.imageio import IMAGE_SUFFIXES, MAX_SERVICE_FIELD_PIXELS, ImageError, decode_field
from device.service import (
    BUSY_MESSAGE,
    CaptureRefused,
    confirmed_parasites,
    ensure_crop,
    finish_slide,
    review_is_final,
    slide_summary,
)
from device.store import Conflict, NotFound
from device.web import deps, health, local_time_text

logger = logging.getLogger(__name__)

CAPTURE_WAIT_S = 60.0  # a capture answers when its field is stored; after this it answers 202 and goes on
# An upload the page's script announced before sending it holds Finish (from any window) until it arrives. The
# page renews the announcement every ANNOUNCE_RENEW_S while its file is on the way, however slow the link; one
# nobody renews (a tab closed, a connection lost) lapses after ANNOUNCED_UPLOAD_TTL_S.
ANNOUNCED_UPLOAD_TTL_S = 20.0
# Uploads decoded whole are refused above imageio.MAX_SERVICE_FIELD_PIXELS (25 MP) before decoding (a one-scan colour
# JPEG read at 1/2 may have up to 50 MP: imageio.decode_field), and uploads are decoded one at a time.
_UPLOAD_DECODING = threading.Lock()
UPLOAD_LIMIT_NOTE = (" of the device's uploads (the memory it keeps for one field); scale the image down, or "
                     "analyse it on a computer with python -m device analyze")
ANNOUNCE_RENEW_S = 8.0
MAX_ANNOUNCED_UPLOADS = 8  # per slide: the oldest announcement gives way to a new one past this
MAX_TEXT = {"sample_id": 64, "patient_id": 64, "operator": 64, "notes": 2000}
RBC_MILLIONS_RANGE = tuple(v / 1e6 for v in RBC_PER_UL_RANGE)  # the start form asks in millions/uL


class InsufficientStorage(HTTPException):
    code = 507  # werkzeug has no exception class for it
    description = "the disk is full"


def refuse(exc: CaptureRefused):
    """Abort with the refusal's status and reason."""
    if exc.status == 507:
        raise InsufficientStorage(str(exc))
    abort(exc.status, str(exc))


class FormError(ValueError):
    """A form or JSON body a person must correct; the message says what, ``field`` which input (or None)."""

    def __init__(self, message: str, field: str | None = None, *, status: int = 400,
                 open_slide_id: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.status = status  # 409: the state forbids it (a slide of this sample is open), not the input
        self.open_slide_id = open_slide_id


def slide_or_404(slide_id: int) -> dict:
    slide = deps().store.get_slide(slide_id)
    if slide is None:
        abort(404, f"slide {slide_id} not found")
    return slide


def parse_new_slide(data) -> dict:
    """Validate the start-a-slide form (or JSON). Raises :class:`FormError`."""
    values = {}
    for k in MAX_TEXT:
        raw = data.get(k) or ""
        if not isinstance(raw, str):  # JSON may send a number or an object: the record keeps text only
            raise FormError(f"{k.replace('_', ' ')} must be text")
        allowed = "\t\n\r" if k == "notes" else ""  # notes are a multi-line text area
        kinds = {unicodedata.category(ch) for ch in raw if ch not in allowed}
        if "Cc" in kinds:
            raise FormError(f"{k.replace('_', ' ')} contains control characters")
        if "Cs" in kinds:  # half of a character pair: not storable text
            raise FormError(f"{k.replace('_', ' ')} contains a broken character: type it again")
        if k != "notes" and "Cf" in kinds:
            # a zero-width space or a direction mark makes two IDs that look the same on screen differ
            raise FormError(f"{k.replace('_', ' ')} contains invisible characters: type it again")
        values[k] = unicodedata.normalize("NFC", raw.strip())
    if not values["sample_id"]:
        raise FormError("the sample ID is required")
    for k, n in MAX_TEXT.items():
        if len(values[k]) > n:
            raise FormError(f"{k.replace('_', ' ')} is longer than {n} characters")
    given = data.get("rbc_millions_per_ul")
    raw = "" if given is None else str(given).strip()  # 0 is a value to refuse, not "not measured"
    values["rbc_millions_per_ul"] = None
    if raw:
        try:
            v = float(raw.replace(",", "."))
        except ValueError:
            raise FormError("the measured RBC count must be a number of millions per µL, e.g. 4.5",
                            "rbc_millions_per_ul") from None
        lo, hi = RBC_MILLIONS_RANGE
        if not lo <= v <= hi:
            raise FormError(f"the measured RBC count must be between {lo:g} and {hi:g} million per µL",
                            "rbc_millions_per_ul")
        values["rbc_millions_per_ul"] = v
    return values


def start_slide(values: dict) -> int:
    d = deps()
    try:
        model = d.analyser.model_info()
    except CaptureRefused as exc:
        refuse(exc)
    measured = values["rbc_millions_per_ul"]
    try:  # two open slides of one sample would split its fields between two results: the store refuses it
        return d.store.create_slide(
            sample_id=values["sample_id"], patient_id=values["patient_id"], operator=values["operator"],
            notes=values["notes"], model=model, target_rbc=d.config.analysis.counting_target_rbc,
            rbc_per_ul=measured * 1e6 if measured else d.config.analysis.rbc_per_ul,
            rbc_per_ul_measured=bool(measured),
            review_floor=review_floor_at(d.config.analysis.review_floor, model.threshold))
    except Conflict as exc:
        raise FormError(str(exc), status=409, open_slide_id=getattr(exc, "slide_id", None)) from None


def _decode_upload() -> tuple[np.ndarray, tuple[int, int] | None]:
    """The uploaded field: (RGB image, the picture's size when the image was decoded reduced from it)."""
    d = deps()
    f = request.files["image"]
    name = Path(f.filename or "upload").name  # for messages only: an upload is never saved under its name
    # the name's suffix, spaces around it aside: "field.jpg " (a name typed or mangled) was refused
    if Path(name.strip()).suffix.lower().strip() not in IMAGE_SUFFIXES:
        d.analyser.metrics.inc("uploads_refused_total")
        abort(400, f"{name}: not an image file (use PNG, JPEG, WebP, BMP or TIFF)")
    data = f.read()
    # One upload is decoded at a time, and none while the analyser is full (it would be refused after its
    # decoding): four 24 MP uploads at once, each decoded in its own request thread, took the service to
    # 635 MB, past the unit's MemoryMax (600 MB).
    with _UPLOAD_DECODING:
        if d.analyser.full():
            d.analyser.metrics.inc("captures_refused_total")
            abort(503, BUSY_MESSAGE)
        try:
            # damaged JPEG data refused as by the CLI: every JPEG decoding in the service (a USB camera's MJPG
            # frames too) holds the lock the check listens under. 21 of 32 copies of the samples with 8 kB of
            # garbage or zeros were counted (27 cells of 69), the others rejected with camera advice.
            # a colour JPEG of large cells over 16 MP is decoded at 1/2 (1/4, 1/8): one of one scan up to 50 MP
            rgb, factor, size = decode_field(data, name=name, max_whole_pixels=MAX_SERVICE_FIELD_PIXELS,
                                             limit_note=UPLOAD_LIMIT_NOTE)
            return rgb, (size if factor != 1 else None)
        except ImageError as exc:
            d.analyser.metrics.inc("uploads_refused_total")
            abort(400, str(exc))


# A capture asks with a CSRF token or an empty JSON object; a larger body is a file sent the wrong way
# (curl --data-binary sends it form-encoded), and must not turn into a capture of the live camera frame.
CAPTURE_BODY_MAX = 4096


def _same_as_any(view: np.ndarray, looks: list[tuple[np.ndarray, np.ndarray | None]]) -> bool:
    """:func:`same_view` of ``view`` against each look (with its blurred copy, None for a view too small to
    blur), ``view`` blurred once."""
    blurred = None
    for look, look_blurred in looks:
        if look.shape != view.shape:
            continue
        if blurred is None and look_blurred is not None:
            blurred = view_blurred(view)
        if same_view(view, look, blurred, look_blurred):  # too small a view: compared as it is, blurs unused
            return True
    return False


class CountedViews:
    """Per slide: the camera views of its counted fields (by field ID, with the high-passed copy the overlap
    check compares), and the views whose capture is being analysed (this app's, in memory).

    A capture reserves its view before the analysis starts, so two requests for one view (a double
    click without script, two clients) cannot both count it, and a view the stage came back to (or an
    image uploaded again) is not counted a second time. When its field is stored and used, the view
    joins the slide's counted ones; when the capture fails or the field is rejected, the view is simply
    dropped, so that field may be refocused and captured again.
    """

    # Memory: a view is 19 kB, its high-passed copy 77 kB. The copies are kept for the newest fields of a
    # slide only (overlap is checked against those), and the views of the most recently used slides only
    # (others are read back from the records when needed): a slide left open must not hold 100 MB.
    OVERLAP_FIELDS = 200
    SLIDES_KEPT = 8

    def __init__(self, load: Callable[[int], dict[int, np.ndarray]] = lambda slide_id: {}) -> None:
        self.lock = threading.Lock()
        self.counted: OrderedDict[int, dict[int, tuple[np.ndarray, np.ndarray | None]]] = OrderedDict()
        self.inflight: dict[int, list[np.ndarray]] = {}
        # Per slide: captures whose field is still being received (an upload decoding: up to seconds for a
        # large PNG on a Pi) and so has no view to reserve yet. Finish and Discard wait for them as well.
        self.receiving: dict[int, int] = {}
        # Per slide: uploads announced by the page's script (token -> monotonic expiry) and not yet arrived. The
        # server takes a request's whole body in before the app sees it, so a file on its way is otherwise unseen.
        # A lapsed announcement is kept (it holds nothing) so that a late renewal can bring it back.
        self.announced: dict[int, dict[str, float]] = {}
        self.finished: set[int] = set()  # a capture settling after Finish must not keep its view
        self.closing: set[int] = set()  # Finish found the slide idle and is closing it: no new announcement
        # Bumped when a slide's counted fields change (reload): a capture reserved before that must not
        # add its view to the reloaded set (its field may have been excluded meanwhile); the slide's
        # views are read back from the records instead.
        self._generation: dict[int, int] = {}
        self._reserved_at: dict[int, int] = {}  # id(view) -> its slide's generation at reserve()
        # The counted views are stored with their fields: after a restart they are read back once per slide.
        self._load = load

    def _views(self, slide_id: int) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
        """Under the lock: the slide's counted views, read from the records the first time."""
        if slide_id not in self.counted:  # a failed read raises: tried again next time
            views = self._load(slide_id)
            recent = set(sorted(views)[-self.OVERLAP_FIELDS:])
            self.counted[slide_id] = {fid: (v, prepare_view(v) if fid in recent else None)
                                      for fid, v in views.items()}
            while len(self.counted) > self.SLIDES_KEPT:
                self.counted.popitem(last=False)  # the least recently used slide: read back when needed
        self.counted.move_to_end(slide_id)
        return self.counted[slide_id]

    @contextmanager
    def receiving_field(self, slide_id: int) -> Iterator[None]:
        """While a capture of this slide decodes its field, before it can :meth:`reserve` the view."""
        with self.lock:
            self.receiving[slide_id] = self.receiving.get(slide_id, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.receiving[slide_id] -= 1
                if not self.receiving[slide_id]:
                    del self.receiving[slide_id]

    def announce(self, slide_id: int, ttl_s: float) -> str | None:
        """An upload to this slide is about to be sent: :meth:`busy` until :meth:`arrived` or ``ttl_s`` without
        a :meth:`renew`. None when the slide is being finished or is finished: the file would be refused."""
        token = secrets.token_urlsafe(12)
        now = time.monotonic()
        with self.lock:
            if slide_id in self.closing or slide_id in self.finished:
                return None
            kept = self.announced.setdefault(slide_id, {})
            while len(kept) >= MAX_ANNOUNCED_UPLOADS:  # the lapsed ones first: they expired first
                del kept[min(kept, key=kept.__getitem__)]
            kept[token] = now + ttl_s
        return token

    def renew(self, slide_id: int, token: str, ttl_s: float) -> bool:
        """The announced file is still on its way: held ``ttl_s`` more, also when the renewal comes after the
        announcement lapsed (a computer asleep, a throttled background tab), unless Finish is closing or has
        closed the slide meanwhile. False when it arrived, was withdrawn or is unknown."""
        now = time.monotonic()
        with self.lock:
            kept = self.announced.get(slide_id, {})
            if token not in kept or slide_id in self.closing or slide_id in self.finished:
                return False
            kept[token] = now + ttl_s
            return True

    def arrived(self, slide_id: int, token: str) -> bool:
        """The announced upload is here (its request now holds the slide as being received), or gave up.
        False when no such announcement was kept."""
        with self.lock:
            kept = self.announced.get(slide_id)
            if kept is None or kept.pop(token, None) is None:
                return False
            if not kept:
                del self.announced[slide_id]
            return True

    def _busy(self, slide_id: int) -> bool:
        now = time.monotonic()
        return bool(any(until > now for until in self.announced.get(slide_id, {}).values())
                    or self.receiving.get(slide_id) or self.inflight.get(slide_id))

    def busy(self, slide_id: int) -> bool:
        """A capture of this slide is announced, being received or has its view reserved (analysed, not
        settled)."""
        with self.lock:
            return self._busy(slide_id)

    def close_if_idle(self, slide_id: int) -> bool:
        """Finish: True, and no upload can be announced from now on, when nothing of the slide is on its way,
        being received or analysed (one step: an announcement cannot slip in between)."""
        with self.lock:
            if self._busy(slide_id):
                return False
            self.closing.add(slide_id)
            return True

    def reopen(self, slide_id: int) -> None:
        """Finish did not close the slide after all (refused): uploads may be announced again."""
        with self.lock:
            self.closing.discard(slide_id)

    def reserve(self, slide_id: int, view: np.ndarray, what: str = "this field",
                turned: Sequence[np.ndarray] = ()) -> None:
        """Raises Conflict when the view is counted already or being analysed; also when one of the ``turned``
        views is (an uploaded picture turned back: :func:`device.camera.turned_views`)."""
        looks = [(look, view_blurred(look)) for look in (view, *turned)]
        with self.lock:
            taken = [v for v, _ in self._views(slide_id).values()] + self.inflight.get(slide_id, [])
            if any(_same_as_any(v, looks) for v in taken):
                raise Conflict(f"{what} is already counted: move the stage to the next field, then capture"
                               if what == "this field" else f"{what} is already counted in this slide")
            self.inflight.setdefault(slide_id, []).append(view)
            self._reserved_at[id(view)] = self._generation.get(slide_id, 0)

    def settle(self, slide_id: int, view: np.ndarray, field_id: int | None) -> None:
        """The capture is over: ``field_id`` of its stored, used field, or None (failed or rejected)."""
        with self.lock:
            self.inflight[slide_id] = [v for v in self.inflight.get(slide_id, []) if v is not view]
            if not self.inflight[slide_id]:
                del self.inflight[slide_id]
            reserved_at = self._reserved_at.pop(id(view), None)
            if field_id is not None and reserved_at != self._generation.get(slide_id, 0):
                self.counted.pop(slide_id, None)  # changed meanwhile: read back what the records say
            elif field_id is not None and slide_id not in self.finished and slide_id in self.counted:
                views = self.counted[slide_id]
                views[field_id] = (view, prepare_view(view))
                prepared = sorted(fid for fid, (_, p) in views.items() if p is not None)
                for fid in prepared[:-self.OVERLAP_FIELDS]:  # only the newest fields' copies are kept
                    views[fid] = (views[fid][0], None)

    def same_as(self, slide_id: int, view: np.ndarray) -> int | None:
        """The ID of a counted field of the slide that shows this very view, or None."""
        with self.lock:
            return next((fid for fid, (v, _) in self._views(slide_id).items() if same_view(v, view)), None)

    def overlapping(self, slide_id: int, field_id: int, view: np.ndarray) -> tuple[float, int] | None:
        """(share, field ID) of the counted field whose view ``view`` overlaps most, other than
        ``field_id``, among the slide's newest :data:`OVERLAP_FIELDS`; None when none does."""
        mine = prepare_view(view)
        with self.lock:
            others = [(fid, p) for fid, (_, p) in self._views(slide_id).items() if fid != field_id and p is not None]
        best = max(((prepared_overlap(mine, p), fid) for fid, p in others), default=None)
        return best if best and best[0] > 0 else None

    def reload(self, slide_id: int) -> None:
        """The slide's counted fields changed (one excluded or counted again): read its views back."""
        with self.lock:
            self.counted.pop(slide_id, None)
            self._generation[slide_id] = self._generation.get(slide_id, 0) + 1

    def forget(self, slide_id: int) -> None:
        """A finished slide takes no more fields: its views are not kept (months of slides on a Pi)."""
        with self.lock:
            self.counted.pop(slide_id, None)
            self.announced.pop(slide_id, None)
            self.closing.discard(slide_id)
            self.finished.add(slide_id)


def _counted_views() -> CountedViews:
    from flask import current_app

    views = current_app.extensions.get("malaria_detect_counted_views")
    if views is not None:
        return views
    store = deps().store

    def load(slide_id: int) -> dict[int, np.ndarray]:
        decoded = {fid: decode_view(png) for fid, png in store.counted_views_png(slide_id).items()}
        return {fid: v for fid, v in decoded.items() if v is not None}

    # built once per app, not on every capture (setdefault keeps a race between two first captures safe)
    return current_app.extensions.setdefault("malaria_detect_counted_views", CountedViews(load))


def hold_receiving(slide_id: int) -> None:
    """Count this request as a capture of ``slide_id`` being received until :func:`release_receiving` (the
    app's teardown); once per request."""
    if "malaria_detect_receiving" in g:
        return
    views = _counted_views()
    hold = views.receiving_field(slide_id)
    hold.__enter__()
    g.malaria_detect_receiving = hold
    token = request.args.get("incoming")
    if token:  # announced before it was sent: held from here on by the request itself
        views.arrived(slide_id, token)


def announce_upload(slide_id: int) -> dict:
    """The page's script is about to send a field: Finish, from any window, waits for it while the page
    renews the announcement. Refused at once for a slide being finished or finished: the file is not sent
    for nothing."""
    slide = slide_or_404(slide_id)
    token = _counted_views().announce(slide_id, ANNOUNCED_UPLOAD_TTL_S) if slide["status"] == "open" else None
    if token is None:
        abort(409, f"slide {slide['sample_id']} is finished: start a new slide to capture more fields")
    return {"incoming": token, "expires_s": ANNOUNCED_UPLOAD_TTL_S, "renew_s": ANNOUNCE_RENEW_S}


def renew_announcement(slide_id: int, token: str, withdraw: bool = False) -> dict:
    """The announced file is still on its way (renewed, even after it lapsed), or will not come after all
    (``withdraw``: its sending failed). 404 when there is no such announcement (its upload arrived, it was
    withdrawn, or the slide is being finished or is finished)."""
    views = _counted_views()
    if withdraw:
        if not views.arrived(slide_id, token):
            abort(404, "no such announcement: its upload arrived or it was withdrawn")
        return {"withdrawn": True}
    if not views.renew(slide_id, token, ANNOUNCED_UPLOAD_TTL_S):
        abort(404, "no such announcement: its upload arrived, or the slide is being finished")
    return {"incoming": token, "expires_s": ANNOUNCED_UPLOAD_TTL_S}


def release_receiving() -> None:
    hold = g.pop("malaria_detect_receiving", None)
    if hold is not None:
        hold.__exit__(None, None, None)


def capture(slide_id: int) -> dict | None:
    """Capture the live frame (or the uploaded ``image``) into a slide and wait for its analysis.

    Returns the stored field row, or None when the analysis is still running after
    :data:`CAPTURE_WAIT_S` (it will still be stored). Aborts with 4xx/5xx and a reason otherwise.
    """
    d = deps()
    problem, view, counted, shown_size = None, None, _counted_views(), None
    settle_lock, settled = threading.Lock(), False  # once; a second caller waits until the first is through

    def settle(fut=None) -> None:  # the view counts only when its field is stored and not rejected
        nonlocal settled
        if view is None:
            return
        with settle_lock:
            if settled:
                return
            settled = True
            ok = fut is not None and not fut.cancelled() and fut.exception() is None
            stored = (fut.result() or {}) if ok else {}
            counted.settle(slide_id, view, stored.get("id") if stored and not stored.get("rejected") else None)
    # The whole request counts as a capture being received, from its first step (the app's request hook,
    # before the CSRF check parses a form; here for a caller without it): Finish pressed meanwhile waits for
    # this field. Registered only around the decoding, an upload still being parsed (werkzeug spools a large
    # body to a file first) or a frame being thumbnailed let Finish close the slide, and the field was then
    # refused as "slide is finished".
    hold_receiving(slide_id)
    slide = slide_or_404(slide_id)
    if slide["status"] != "open":
        abort(409, f"slide {slide['sample_id']} is finished: start a new slide to capture more fields")
    if "image" in request.files:
        if not request.files["image"].filename:
            abort(400, "no file chosen")
        (rgb, shown_size), source = _decode_upload(), "upload"
        view = thumbnail(rgb, shown_size)  # the same picture uploaded again would count its cells twice
        try:
            # also turned or mirrored (an editor, a phone held upright, an app that drops the EXIF orientation)
            counted.reserve(slide_id, view, "this image", turned_views(rgb, shown_size))
        except Conflict as exc:
            d.analyser.metrics.inc("captures_refused_total")
            abort(409, str(exc))
    elif request.mimetype in ("multipart/form-data", "application/octet-stream") or request.mimetype.startswith(
        "image/"
    ) or (request.content_length or 0) > CAPTURE_BODY_MAX:
        # An upload that went wrong must not turn into a capture of whatever the camera shows.
        d.analyser.metrics.inc("uploads_refused_total")
        abort(400, 'no image in the upload: send the file as the multipart form field "image"')
    else:
        frame = d.camera.latest()
        if frame is None:
            msg = d.camera.status().get("message") or "no frame yet"
            d.analyser.metrics.inc("captures_refused_total")
            abort(503, f"the camera is not connected ({msg}): check the cable; the device keeps retrying")
        stalled = d.camera.stalled_s() if hasattr(d.camera, "stalled_s") else None
        if stalled is not None:  # its newest picture is not what the microscope shows now
            d.analyser.metrics.inc("captures_refused_total")
            abort(503, f"the camera has sent no new picture for {stalled:.0f} s: check the cable; the device "
                       "restarts it if it stays stuck")
        # Capture pressed again before the stage moved would count the same cells twice.
        if frame.rgb is not None:
            view = thumbnail(frame.rgb)
            try:
                counted.reserve(slide_id, view)
            except Conflict as exc:
                d.analyser.metrics.inc("captures_refused_total")
                abort(409, str(exc))
        # A frame the camera sent but that cannot be analysed is stored as a rejected field with the reason.
        rgb, source, problem = frame.rgb, "camera", getattr(frame, "problem", None)
    try:
        try:
            fut = d.analyser.submit(slide_id, rgb, source, problem=problem,
                                    view_png=None if view is None else encode_view(view), shown_size=shown_size)
        except BaseException:
            settle()  # nothing was queued: the view is free again
            raise
    except CaptureRefused as exc:
        refuse(exc)
    except NotFound as exc:
        abort(404, str(exc))
    except Conflict as exc:
        abort(409, str(exc))
    fut.add_done_callback(settle)  # also when the answer was a 202 and the field is rejected later
    try:
        try:
            field = fut.result(timeout=CAPTURE_WAIT_S)
        finally:
            # Before the answer: done-callbacks run after result() returns, and a client acting on the answer
            # (capturing the same view again, counting another) would meet the view still reserved.
            if fut.done():
                settle(fut)
    except FutureTimeout:
        field = None  # still analysing: it will be stored, and most likely counted
    except NotFound as exc:
        abort(404, str(exc))
    except Conflict as exc:
        abort(409, str(exc))
    except CaptureRefused as exc:
        refuse(exc)
    except CancelledError:  # queued when the service began to stop: never analysed, nothing stored
        refuse(CaptureRefused("the service is stopping: capture again once it is back", 503))
    except Exception as exc:  # logged by the analyser; the page gets the reason, not a traceback
        abort(500, f"the analysis failed ({type(exc).__name__}: {exc}); see the service log")
    return field


def finish(slide_id: int) -> dict:
    """Close the slide once the fields still being analysed are stored (Finish pressed during a
    capture counts that field instead of throwing it away)."""
    slide_or_404(slide_id)
    analyser = deps().analyser
    deadline = time.monotonic() + CAPTURE_WAIT_S

    views = _counted_views()

    def closed() -> bool:  # this slide's own fields (a capture reserved, or queued); other slides' do not matter
        own = analyser.pending_for(slide_id) if hasattr(analyser, "pending_for") else getattr(analyser, "pending", 0)
        return not own and views.close_if_idle(slide_id)

    while not closed():
        if time.monotonic() > deadline:
            abort(409, "a field is still being uploaded or analysed: press Finish again in a moment")
        time.sleep(0.05)
    try:
        done = finish_slide(deps().store, slide_id)
    except BaseException as exc:
        views.reopen(slide_id)
        if isinstance(exc, Conflict):
            abort(409, str(exc))
        raise
    views.forget(slide_id)
    return done


def discard(slide_id: int) -> dict:
    """Delete an open slide with no fields (started by mistake); refused while a field is being analysed."""
    slide_or_404(slide_id)
    if _counted_views().busy(slide_id):  # this slide's own captures; other slides' do not matter
        abort(409, "a field of this slide is being uploaded or analysed: try again in a moment")
    with _store_answers():
        slide = deps().store.discard_slide(slide_id)
    _counted_views().forget(slide_id)
    return slide


@contextmanager
def _store_answers() -> Iterator[None]:
    """A store's refusal as the page's answer: not found 404, not possible now 409, bad value 400."""
    try:
        yield
    except NotFound as exc:
        abort(404, str(exc))
    except Conflict as exc:
        abort(409, str(exc))
    except ValueError as exc:
        abort(400, str(exc))


OVERLAP_WARN = 0.5  # a field sharing this much of its view with a counted one counts those cells twice


def overlap_warning(field: dict) -> dict | None:
    """``{"field_id", "seq", "fraction"}`` of the other counted field of the slide whose camera view this
    used field's overlaps most, when that is at least :data:`OVERLAP_WARN` (the stage was moved too
    little, or moved back): the shared cells count twice, and the technician may exclude one. None
    otherwise (uploads have a view too: their own picture's). The counted views are kept decoded and
    high-passed in memory: one comparison per counted field, not a read of each from the records."""
    if field.get("rejected") or field.get("excluded"):
        return None
    png = deps().store.field_view_png(field["id"])
    mine = decode_view(png) if png is not None else None
    if mine is None:
        return None
    best = _counted_views().overlapping(field["slide_id"], field["id"], mine)
    if best is None or best[0] < OVERLAP_WARN:
        return None
    seq = (deps().store.get_field(best[1]) or {}).get("seq", best[1])
    return {"field_id": best[1], "seq": seq, "fraction": round(best[0], 2)}


def exclude_field(field_id: int, reason: str | None) -> dict:
    """Take a field out of its slide's count (``reason``) or count it again (None): the stored field row.

    Counting a field again is refused while another counted field shows the same camera view (it was
    excluded, then the unmoved view captured again): the same cells must not count twice.
    """
    store, counted = deps().store, _counted_views()
    mine, slide_id = None, None
    if reason is None:
        f = store.get_field(field_id)
        png = store.field_view_png(field_id) if f is not None and f["excluded"] is not None else None
        mine = decode_view(png) if png is not None else None
        slide_id = f["slide_id"] if f is not None else None
        other_id = counted.same_as(slide_id, mine) if mine is not None else None
        if other_id is not None:  # an excluded field is not among the counted views: any match is another
            seq = (store.get_field(other_id) or {}).get("seq", other_id)
            abort(409, f"field {seq} shows the same view and is counted: exclude it first, or the "
                       "same cells would count twice")
        if mine is not None:
            # held as a capture holds its view, until the field counts again: a capture of the same view
            # meanwhile is refused, and one already being analysed refuses this
            try:
                counted.reserve(slide_id, mine, "this field's view")
            except Conflict:
                abort(409, "a capture of the same view is being analysed: wait for it, then exclude one of "
                           "the two, or the same cells would count twice")
    stored = None
    try:
        with _store_answers():
            field = stored = store.exclude_field(field_id, reason)
    finally:
        if mine is not None:
            counted.settle(slide_id, mine, stored["id"] if stored else None)
    counted.reload(field["slide_id"])  # an excluded field's view may be captured again
    logger.info("field %d of slide %d %s", field_id, field["slide_id"],
                f"excluded ({reason})" if reason else "counted again")
    return field


def review(cell_id: int, decision: str | None, seen: str | None = None) -> dict:
    """``seen``: the decision the page showed ("" none; None when the client does not say)."""
    if decision in ("", "clear"):
        decision = None
    kwargs = {} if seen is None else {"seen": seen or None}
    store = deps().store
    cell = store.get_cell(cell_id)
    reviewable = cell is not None and (cell["infected"] or cell["near"])  # else the store says why not
    if decision is not None and reviewable and ensure_crop(store, cell_id) is None:
        # a decision on a cell nobody can see would be a guess: one "parasite" makes the slide positive
        abort(409, "no picture of this cell can be shown (records restored from a copy hold none, or the field's "
                   "picture cannot be read), so it cannot be judged here: look at it under the microscope")
    with _store_answers():
        return store.review_cell(cell_id, decision, **kwargs)


# --- JSON shapes ----------------------------------------------------------------------------------

def field_json(f: dict) -> dict:
    return {
        "id": f["id"], "slide_id": f["slide_id"], "seq": f["seq"], "captured_at": f["captured_at"],
        "captured_at_local": local_time_text(f["captured_at"]),
        "source": f["source"], "width": f["width"], "height": f["height"], "rejected": f["rejected"],
        "focus": round(f["focus"], 2), "rbc_count": f["rbc_count"], "infected_count": f["infected_count"],
        "model_sha256": f["model_sha256"], "threshold": f["threshold"],
        "excluded": f.get("excluded"), "excluded_at": f.get("excluded_at"),
        "exclude_url": url_for("pages.exclude_field", field_id=f["id"]),
        "timing_ms": json.loads(f["timing_json"] or "{}"),
        "annotated_url": (url_for("pages.field_image", field_id=f["id"], kind="annotated") if f["has_annotated"]
                          else None),
        "raw_url": url_for("pages.field_image", field_id=f["id"], kind="raw") if f["has_raw"] else None,
    }


def cell_json(c: dict) -> dict:
    return {"id": c["id"], "field_id": c["field_id"], "field_seq": c.get("field_seq"), "idx": c["idx"],
            "bbox": [c["x"], c["y"], c["w"], c["h"]], "p_infected": float(c["p_infected"]),
            "infected": bool(c["infected"]), "review": c["review"], "reviewed_at": c["reviewed_at"],
            "crop_url": url_for("pages.cell_crop", cell_id=c["id"]) if c["has_crop"] else None}


def slide_view(slide: dict) -> dict:
    """Slide row + totals + automatic and reviewed results: what the pages and the API show."""
    store = deps().store
    totals = store.totals(slide["id"])
    stored = json.loads(slide["result_json"]) if slide["result_json"] else None
    automatic = stored["automatic"] if stored else slide_summary(slide, totals).to_json()
    reviewed = slide_summary(slide, totals, reviewed=True).to_json()
    # What the banner leads with: the result after review once it stands on its own (a parasite
    # confirmed, or every flagged cell reviewed); until then the two are the same.
    headline = "reviewed" if review_is_final(totals) else "automatic"
    # While flagged cells wait for review, the count "after review" still holds them (only rejections leave
    # at once): no density to read off it. What review has established so far is the confirmed cells' share,
    # a lower bound (a confirmed parasite on a slide of 2,098 cells read as 0.858% with 17 cells unseen).
    pending, n = totals["review"]["pending"], automatic["rbc_count"]
    confirmed = confirmed_parasites(totals)  # flagged and near the threshold
    review_open = None if not pending else {
        "pending": pending, "confirmed": confirmed,
        "confirmed_pct": 100.0 * confirmed / n if n else 0.0,
        "confirmed_per_ul": confirmed / n * automatic["rbc_per_ul"] if n else 0.0,
    }
    return {**{k: v for k, v in slide.items() if k != "result_json"}, "totals": totals,
            "automatic": automatic, "reviewed": reviewed, "headline": headline, "review_open": review_open,
            "current": reviewed if headline == "reviewed" else automatic}


def slide_json(slide: dict, *, with_fields: bool = False) -> dict:
    out = slide_view(slide)
    out.pop("current")  # the API gives both results and "headline" says which the pages lead with
    out["url"] = url_for("pages.slide", slide_id=slide["id"])
    out["result_url"] = url_for("pages.result", slide_id=slide["id"])
    if with_fields:
        out["fields"] = [field_json(f) for f in deps().store.list_fields(slide["id"])]
    return out


def clock_status() -> dict:
    """{"now": ISO time, "problem": why the clock looks wrong or None, "can_confirm": whether an admin may
    say it is right (when only records contradict it)}; never raises (a broken database or card leaves
    that check out)."""
    d = deps()
    now = health.wall_clock()
    try:
        newest = d.store.newest_record_time()
    except Exception:  # the page must still render; the storage problem is reported elsewhere
        logger.debug("newest record time unavailable", exc_info=True)
        newest = None
    try:
        made = datetime.fromisoformat(d.analyser.model.card_date) if d.analyser.model.card_date else None
        made = made if made is None or made.tzinfo else made.replace(tzinfo=UTC)
    except ValueError:
        made = None
    problem = health.clock_problem(now, newest, made)
    # behind the records only: the clock may be right and the records dated by a clock that ran ahead
    behind_records = health.clock_behind(now, newest)
    return {"now": now.isoformat(timespec="seconds"), "problem": problem,
            "can_confirm": bool(problem and behind_records)}


def status_json() -> dict:
    d = deps()
    cam = d.camera.status()
    a = d.analyser
    return {
        "ok": bool(a.model.ok and cam["state"] == "connected"),
        "time": time.time(),
        "camera": cam,
        "model": a.model.to_json(),
        "analysis": {"busy": a.busy, "pending": a.pending,
                     "last_latency_ms": None if a.last_latency_s is None else round(a.last_latency_s * 1000)},
        "disk": a.disk().to_json(),
        "clock": clock_status(),
        "records_damage": d.store.damage,
    }
