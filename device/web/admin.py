"""The admin pages: first-run setup, sign-in (rate-limited), device health, settings, password.

Every page and every change here needs the admin password (``admin_required``). Settings are validated
with :meth:`device.config.Config.with_changes`, kept in ``settings.json`` in the data folder (the config
file is read-only under systemd) and applied at once: the counting target and the threshold to slides
started from now on, the camera by reopening it, the PIN to the next technician request.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from flask import Blueprint, Response, flash, redirect, render_template, request, session, url_for

import device
from device.config import THRESHOLD_SAFE_RANGE, ConfigError, review_floor_at
from device.service import SettingsNotSaved, free_annotated_images, free_raw_frames
from device.slide import threshold_text
from device.web import (
    admin_signed_in,
    deps,
    error_response,
    health,
    refuse_if_too_many,
    security,
    sign_in_admin,
    sign_out_admin,
    views,
)

logger = logging.getLogger(__name__)
bp = Blueprint("admin", __name__, url_prefix="/admin")

CAMERA_SOURCES = ("picamera2", "opencv", "replay")
_setup_lock = threading.Lock()  # two first-run setups at once: the second finds the password set


def admin_required(view):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not admin_signed_in():
            if not deps().config.security.admin_password_hash:
                return redirect(url_for("admin.setup"))
            if request.method != "GET":
                return error_response(401, "admin sign-in needed: sign in at /admin/login")
            return redirect(url_for("admin.login", next=request.path))
        return view(*args, **kwargs)
    return wrapper


def _client() -> str:
    return request.remote_addr or "?"


# --- the page ----------------------------------------------------------------------------------------

def _fmt(v, fmt: str, unit: str = "") -> str:
    return "not available" if v is None else f"{v:{fmt}}{unit}"


def device_health() -> dict[str, str]:
    """What the admin checks first, as label -> text."""
    d = deps()
    cfg = d.config
    disk = d.analyser.disk()
    mem = health.memory_mb()
    load = health.load_average()
    counts = d.store.slide_counts()
    service_up = d.uptime_s()
    since = datetime.now().astimezone() - timedelta(seconds=service_up)  # on the clock as it reads now
    return {
        "CPU temperature": _fmt(health.cpu_temperature_c(), ".1f", " °C"),
        "Load (1 / 5 / 15 min)": "not available" if load is None else
        " / ".join(f"{v:.2f}" for v in load) + f" on {os.cpu_count() or '?'} cores",
        "Memory available": "not available" if mem is None else f"{mem[0]:,.0f} MB of {mem[1]:,.0f} MB",
        "Disk free": f"{disk.free_mb / 1000:,.1f} GB" + (f" — {disk.message}" if disk.message else ""),
        "Clock": _clock_text(),
        "Uptime": f"board {health.format_duration(health.uptime_s())}, service "
                  f"{health.format_duration(service_up)} (since {since:%Y-%m-%d %H:%M})",
        "Service version": f"malaria-detect {device.__version__}, Python {sys.version.split()[0]} on "
                           f"{platform.machine()}",
        "Listening on": f"{cfg.service.host}:{cfg.service.port}",
        "Data folder": f"{d.store.data_dir} (database schema {d.store.schema_version})",
        "Records": f"{counts['slides']} slides ({counts['open']} open), {counts['fields']} fields; database "
                   f"{d.store.database_bytes() / 1e6:,.1f} MB",
        "Technician PIN": "set" if cfg.security.technician_pin else "not set (technician pages open on the LAN)",
    }


def _clock_text() -> str:
    clock = views.clock_status()
    now = datetime.fromisoformat(clock["now"]).astimezone()
    text = f"{now:%Y-%m-%d %H:%M} ({now:%Z}): compare it with your watch; slides and reports are dated by it"
    if clock["problem"]:
        text = (f"CHECK — {clock['problem']}. If it is wrong, set it on the Pi: sudo date -s 'YYYY-MM-DD HH:MM' "
                f"(local time, {now:%Z})")
    return text


def _threshold_text(threshold: float | None) -> str:
    """The threshold as the settings form shows it (as every page does; blank: the card's)."""
    return "" if threshold is None else threshold_text(threshold)


def _render(status: int = 200, *, settings_error: str | None = None, password_error: str | None = None,
            form: dict | None = None):
    d = deps()
    cfg = d.config
    values = {"counting_target_rbc": cfg.analysis.counting_target_rbc,
              "threshold": _threshold_text(cfg.model.threshold),
              "camera_source": cfg.camera.source, "camera_device": cfg.camera.device}
    shown = {k: str(v) for k, v in values.items()}  # the stored settings...
    if form is not None:  # ...or, re-showing a refused form, what that form was first shown with: the
        # fields the admin left alone must still not undo another admin's change saved meanwhile
        shown.update({k: request.form["shown_" + k] for k in shown if "shown_" + k in request.form})
    values.update(form or {})
    old = health.wall_clock() - timedelta(days=RAW_FRAME_DAYS_DEFAULT)
    html = render_template(
        "admin.html", shown=shown, health=device_health(), status=views.status_json(),
        metrics=d.analyser.metrics.counts,
        log=d.recent_log.entries(), values=values, sources=CAMERA_SOURCES, safe_range=THRESHOLD_SAFE_RANGE,
        pin_set=bool(cfg.security.technician_pin), settings_error=settings_error, password_error=password_error,
        data_dir=d.store.data_dir, raw_frame_days=RAW_FRAME_DAYS_DEFAULT, review_floor=cfg.analysis.review_floor,
        # as a slide started now keeps it (the configured one while the model is unusable: no slide starts)
        review_floor_now=review_floor_at(cfg.analysis.review_floor,
                                         d.analyser.model.threshold if d.analyser.model.ok else 1.0),
        raw_frames_old=d.store.count_images("raw", old),
        raw_frames_finished=d.store.count_images("raw"),
        annotated_old=d.store.count_images("annotated", old),
        annotated_finished=d.store.count_images("annotated"))
    return html, status


@bp.get("/")
@admin_required
def index():
    return _render()


# Up to this size the records are copied in memory and sent from there (nothing written: it works on a full
# or read-only card); a larger database is copied to a temporary file, which needs its size in free space.
# The unit's MemoryMax is 800 MB, the service itself uses ~110 MB, and the in-memory copy peaks at about
# twice the database (103 MB: peak RSS 57 -> 258 MB, tests/benchmarks/bench_backup.py --slides 800).
BACKUP_IN_MEMORY_MAX_BYTES = 128 * 1024 * 1024
# Each chunk asked for renews the download's turn: 64 KB keeps a download read at 0.5 KB/s alive.
BACKUP_CHUNK_BYTES = 64 * 1024


class BackupTurn:
    """One copy of the records at a time (each holds their size in memory or on disk), per app.

    A download that has sent nothing for ``stale_s`` (a paused browser download keeps its connection and
    its copy) gives its turn up to the next request: its copy is let go at once (the ``box`` it reads
    from is emptied, its file closed), and it sends nothing more once the server asks it for more. Its
    server thread stays waiting on the paused client until that connection closes, so while one such
    download is still open no other turn is given up: at most one thread waits so.
    """

    def __init__(self, stale_s: float = 120.0) -> None:
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._box: list | None = None
        self._seen = 0.0
        self._copying = False  # the copy is being made: never stale (a large one takes minutes on a Pi)
        self._abandoned: list[list] = []  # downloads whose turn was given up, until the server closes them

    def take(self, box: list) -> bool:
        """The turn for ``box`` (then being copied into), or False while another download has it."""
        with self._lock:
            now = time.monotonic()
            if self._box is not None and (self._copying or now - self._seen < self.stale_s or self._abandoned):
                return False
            if self._box is not None:
                logger.warning("a records download sent nothing for %.0f s: its turn goes to a new one",
                               now - self._seen)
                _empty(self._box)
                self._abandoned.append(self._box)
            self._box, self._seen, self._copying = box, now, True
            return True

    def copied(self, box: list) -> None:
        """The copy is made: from now on the download counts as stalled when it sends nothing."""
        with self._lock:
            if self._box is box:
                self._copying, self._seen = False, time.monotonic()

    def alive(self, box: list) -> bool:
        """Still this download's turn (it then counts as active now)."""
        with self._lock:
            if self._box is not box:
                return False
            self._seen = time.monotonic()
            return True

    def give_back(self, box: list) -> None:
        """The download ended (the server closed it, or it failed)."""
        with self._lock:
            if self._box is box:
                self._box, self._copying = None, False
            self._abandoned = [b for b in self._abandoned if b is not box]
        _empty(box)


def _empty(box: list) -> None:
    for item in box:
        if hasattr(item, "close"):
            item.close()
    box.clear()


def _backup_turn() -> BackupTurn:
    from flask import current_app

    return current_app.extensions.setdefault("malaria_detect_backup_turn", BackupTurn())


def _chunks(box: list, turn: BackupTurn) -> Iterator[bytes]:
    """What the box holds (the in-memory copy, or the open file of the copy), in chunks, while it is this
    download's turn. No reference to the copy is kept between chunks, so a turn given up frees it.
    The in-memory copy's header is set to rollback journal (bytes 18-19: 1, not WAL's 2), so the file
    opens on its own, without a -wal beside it."""
    at = 0
    while turn.alive(box) and box:
        source = box[0]
        if isinstance(source, bytes):
            chunk = bytes(memoryview(source)[at : at + BACKUP_CHUNK_BYTES])
            if at == 0 and chunk[18:20] == b"\x02\x02":
                chunk = chunk[:18] + b"\x01\x01" + chunk[20:]
        else:
            chunk = source.read(BACKUP_CHUNK_BYTES)
        del source
        if not chunk:
            return
        at += len(chunk)
        yield chunk


@bp.get("/backup")
@admin_required
def backup():
    """The records as one checked SQLite file, copied while the service runs."""
    d = deps()
    turn, box = _backup_turn(), []
    if not turn.take(box):
        return error_response(409, "a copy of the records is being made already: wait for it, then try again")
    try:
        name = f"malaria-detect-records-{health.wall_clock().astimezone():%Y%m%d-%H%M}.sqlite"
        size = d.store.database_bytes()
        if size <= BACKUP_IN_MEMORY_MAX_BYTES:
            image, info = d.store.snapshot()
            box.append(image)
            del image
        else:
            box.append(_copy_to_file(d, name, size))
            info = box[0].info
        turn.copied(box)
        resp = Response(_chunks(box, turn), mimetype="application/vnd.sqlite3",
                        headers={"Content-Disposition": f"attachment; filename={name}",
                                 "Content-Length": str(info["bytes"]), "Cache-Control": "no-store"})
        resp.call_on_close(lambda: turn.give_back(box))  # the server closes it when the download ends or fails
    except _NoRoom as exc:
        turn.give_back(box)
        return error_response(507, str(exc))
    except BaseException:
        turn.give_back(box)
        raise
    logger.info("records backup downloaded by %s: %d slides, %d fields, %d bytes", _client(), info["slides"],
                info["fields"], info["bytes"])
    return resp


class _NoRoom(Exception):
    pass


class _CopyFile(io.FileIO):
    info: dict


def _copy_to_file(d, name: str, size: int) -> _CopyFile:
    """A large database: copied to a temporary file (Store.backup), if that leaves the disk usable; the file
    is returned open, already unlinked (it goes when closed)."""
    from device.service import free_disk_mb

    tmp_root = Path(tempfile.gettempdir())
    free_mb = free_disk_mb(tmp_root)
    same_disk = tmp_root.stat().st_dev == d.store.data_dir.stat().st_dev
    keep_mb = d.analyser.disk().min_mb if same_disk else 0.0
    if free_mb - size / 1e6 < keep_mb:
        raise _NoRoom(f"not enough free space to copy the records ({size / 1e6:,.0f} MB needed, {free_mb:,.0f} MB free"
                      f"{f', {keep_mb:,.0f} MB kept for captures' if keep_mb else ''}): use Free space below first, "
                      "or copy the data folder with the service stopped (deployment notes)")
    with tempfile.TemporaryDirectory(prefix="malaria-detect-backup-") as tmp:
        info = d.store.backup(Path(tmp) / name)
        fh = _CopyFile(Path(tmp) / name, "rb")  # open before the folder goes; closed when the download ends
    fh.info = info
    return fh


@bp.post("/clock-ok")
@admin_required
def confirm_clock():
    """The admin says the clock is right: records dated by a clock that ran ahead stop counting against it.

    Only when records are what contradicts the clock, and only when the admin's computer agrees with it
    (its time comes with the form): a clock behind after a night off must be set, not confirmed.
    """
    if not views.clock_status()["can_confirm"]:
        flash("The clock: nothing to confirm (no record contradicts it, or it is earlier than the model's date)",
              "error")
        return redirect(url_for("admin.index"), 303)
    now = health.wall_clock()
    try:
        theirs = datetime.fromtimestamp(int(request.form.get("browser_time_ms", "")) / 1000.0, tz=now.tzinfo)
    except (ValueError, OverflowError, OSError):
        flash("The clock was not confirmed: this page needs your computer's time to compare (allow its script)",
              "error")
        return redirect(url_for("admin.index"), 303)
    off_s = (now - theirs).total_seconds()
    if abs(off_s) > CLOCK_CONFIRM_TOLERANCE_S:
        flash(f"The clock was not confirmed: it reads {health.local_text(now)}, your computer "
              f"{health.local_text(theirs)} ({abs(off_s) / 3600:,.1f} h apart). Set the device clock "
              "instead (see Clock above).", "error")
        return redirect(url_for("admin.index"), 303)
    deps().store.confirm_clock()
    logger.warning("admin %s confirmed the device clock (%s; their computer %+.0f s)", _client(), now.isoformat(),
                   -off_s)
    flash("Noted: the clock is right; the records made so far no longer count against it.")
    return redirect(url_for("admin.index"), 303)


CLOCK_CONFIRM_TOLERANCE_S = 300.0


RAW_FRAME_DAYS_DEFAULT = 30


def _days(raw: str) -> int | None:
    try:
        days = int(raw.strip())
    except ValueError:
        return None
    return days if 0 <= days <= 3650 else None


@bp.post("/free-space")
@admin_required
def free_space():
    """Delete the raw frames of slides finished more than ``days`` days ago, and with ``annotated`` their
    annotated fields too; results, cell lists and review crops are kept."""
    d = deps()
    raw = request.form.get("days", "")
    days = _days(raw)
    annotated = request.form.get("annotated") == "1"
    if days is None:
        flash(f"Free space: {raw.strip()!r} is not a number of days from 0 to 3650; nothing was deleted", "error")
        return redirect(url_for("admin.index", _anchor="free-space"), 303)
    clock = views.clock_status()
    if clock["problem"]:
        # "N days ago" is read on this clock, and the slides were dated by it: a wrong one deletes the wrong ones
        flash(f"Free space: {clock['problem']}. Set the clock first (see Clock above); nothing was deleted", "error")
        return redirect(url_for("admin.index", _anchor="free-space"), 303)
    now = health.wall_clock()
    # 0 days: every finished slide, also one dated after now by a clock that ran ahead (an admin confirmed
    # the clock since); with more days such a slide's age is not known, and it is kept (said below)
    before = None if days == 0 else now - timedelta(days=days)
    ahead = 0 if before is None else d.store.count_images("raw") - d.store.count_images("raw", now)
    try:
        freed = free_raw_frames(d.store, before)
    except OSError as exc:
        logger.error("free space: the review crops could not be written to the card: %s", exc)
        flash(f"Free space: writing to the storage failed ({exc.strerror or exc}); nothing was deleted, as the "
              "raw frames are what a lost review crop is cut again from. The card may be failing: download "
              "the records and replace it.", "error")
        return redirect(url_for("admin.index", _anchor="free-space"), 303)
    logger.info("admin %s freed space: raw frames of %d fields of slides finished more than %d days ago, %.1f MB",
                _client(), freed["fields"], days, freed["bytes"] / 1e6)
    text = (f"Deleted the raw frames of {freed['fields']} fields of slides finished more than {days} days ago "
            f"({freed['bytes'] / 1e6:,.1f} MB freed)")
    done = [freed]
    if annotated:
        ann = free_annotated_images(d.store, before)
        logger.info("admin %s freed space: annotated images of %d fields of slides finished more than %d days ago, "
                    "%.1f MB", _client(), ann["fields"], days, ann["bytes"] / 1e6)
        text += (f" and the annotated images of {ann['fields']} fields ({ann['bytes'] / 1e6:,.1f} MB); their results, "
                 "cell lists and flagged cells are kept.")
        done.append(ann)
    else:
        text += "; their results, annotated fields and flagged cells are kept."
    for what, res in zip(("raw frames", "annotated images"), done, strict=False):
        if res["swept"]:
            text += f" {res['swept']} {what} an interrupted earlier run had left were deleted too."
    if ahead:
        text += (f" {ahead} fields of slides dated after now (by a clock that ran ahead) keep their raw frames: "
                 "their age is not known; 0 days frees those too.")
    failed = sum(res["failed"] for res in done)
    if failed:
        text += (f" {failed} could not be deleted (the storage may be failing: see Last problems); "
                 "they are tried again next time.")
    flash(text)
    return redirect(url_for("admin.index", _anchor="free-space"), 303)


# --- settings ----------------------------------------------------------------------------------------

class _Invalid(ValueError):
    pass


def _parse_settings(form) -> dict[str, dict]:
    """The settings form as config changes by section. Raises _Invalid naming the field."""
    cfg = deps().config
    changes: dict[str, dict] = {}

    def touched(name: str) -> bool:
        """Whether the admin changed this field from what their page showed (``shown_<name>``): a page
        loaded before another admin's change must not put the old value back. Without it (a script),
        every field counts."""
        shown = form.get("shown_" + name)
        return shown is None or form.get(name, "").strip() != shown.strip()

    raw = form.get("counting_target_rbc", "").strip()
    try:
        target = int(raw)
    except ValueError:
        raise _Invalid(f"Counting target: {raw!r} is not a whole number of red cells") from None
    if target != cfg.analysis.counting_target_rbc and touched("counting_target_rbc"):
        changes["analysis"] = {"counting_target_rbc": target}
    raw = form.get("threshold", "").strip().replace(",", ".")
    try:
        threshold = float(raw) if raw else None  # blank: the model card's threshold
    except ValueError:
        raise _Invalid(f"Threshold: {raw!r} is not a number") from None
    shown = _threshold_text(cfg.model.threshold)
    # the field as shown, untouched: no change
    if threshold != cfg.model.threshold and raw != shown and touched("threshold"):
        lo, hi = THRESHOLD_SAFE_RANGE  # outside it the config's own message says so
        problem = deps().analyser.threshold_problem(threshold) if threshold is None or lo <= threshold <= hi else None
        if problem:
            raise _Invalid(f"Threshold: {problem}")
        changes["model"] = {"threshold": threshold}
    camera = {"source": form.get("camera_source", cfg.camera.source),
              "device": form.get("camera_device", cfg.camera.device).strip() or "0"}
    camera = {k: v for k, v in camera.items() if v != getattr(cfg.camera, k) and touched("camera_" + k)}
    if camera:
        changes["camera"] = camera
    if form.get("remove_pin"):
        if cfg.security.technician_pin:
            changes["security"] = {"technician_pin": ""}
    else:
        pin = form.get("technician_pin", "").strip()
        if pin and pin != cfg.security.technician_pin:
            changes["security"] = {"technician_pin": pin}
    return changes


def _describe(key: str, value) -> str:
    """A change as the admin reads it (never the PIN itself)."""
    if key == "technician_pin":
        return "technician PIN " + ("set" if value else "removed")
    if key == "threshold":
        return "threshold: the model card's" if value is None else f"threshold {threshold_text(value)}"
    return {"counting_target_rbc": f"counting target {value} red cells", "source": f"camera {value}",
            "device": f"USB camera device {value}"}.get(key, f"{key} {value}")


@bp.post("/settings")
@admin_required
def settings():
    d = deps()
    form = {k: request.form.get(k, "") for k in ("counting_target_rbc", "threshold", "camera_source", "camera_device")}
    try:
        changes = _parse_settings(request.form)
        if not changes:
            flash("Nothing changed.")
            return redirect(url_for("admin.index", _anchor="settings"), 303)
        def apply_live(new_cfg) -> None:  # under the settings lock, in the order the configs were made
            if "model" in changes:
                d.analyser.set_threshold(new_cfg.model.threshold)
            if "camera" in changes and hasattr(d.camera, "reopen"):
                d.camera.reopen(d.camera_opener(new_cfg.camera), new_cfg.camera.source)

        d.settings.update(d, changes, after=apply_live)
    except _Invalid as exc:
        return _render(400, settings_error=str(exc), form=form)
    except ConfigError as exc:  # names the key and the allowed range
        return _render(400, settings_error=f"Not saved: {exc}", form=form)
    except SettingsNotSaved as exc:  # a full disk or a read-only data folder: said, not a bare 500
        return _render(exc.status, settings_error=str(exc), form=form)
    said = [_describe(k, v) for values in changes.values() for k, v in values.items()]
    logger.info("admin at %s changed settings: %s", _client(), "; ".join(said))
    flash("Saved: " + "; ".join(said) + ".")
    return redirect(url_for("admin.index", _anchor="settings"), 303)


@bp.post("/password")
@admin_required
def password():
    """Change the admin password: the current one is asked again (a session left open is not enough)."""
    d = deps()
    client = "admin:" + _client()
    if (refused := refuse_if_too_many(client, "wrong passwords")) is not None:  # a wrong answer stays counted
        return refused
    current, new, again = (request.form.get(k, "") for k in ("current", "password", "password2"))
    if not security.check_password(d.config.security.admin_password_hash, current):  # stays counted
        logger.warning("wrong current password on a password change from %s", _client())
        return _render(401, password_error="The current password is wrong")
    d.login_limiter.reset(client)
    if new != again:
        return _render(400, password_error="The two new passwords differ")
    try:
        hashed = security.hash_password(new)  # slow on a Pi: before the settings lock, not inside it
        d.settings.update(d, {"security": {"admin_password_hash": hashed}})
    except ValueError as exc:
        return _render(400, password_error=str(exc).capitalize())
    except SettingsNotSaved as exc:
        return _render(exc.status, password_error=str(exc))
    sign_in_admin()  # this session stays signed in; every other admin session is signed out
    d.admin_sessions.end_all_but(session.get("admin_sid"))
    logger.info("admin password changed from %s", _client())
    flash("Password changed: other admin sessions are signed out.")
    return redirect(url_for("admin.index"), 303)


# --- sign-in and first run ---------------------------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    d = deps()
    if not d.config.security.admin_password_hash:
        return redirect(url_for("admin.setup"))
    nxt = security.local_path(request.values.get("next"), "/admin") or url_for("admin.index")
    if request.method == "GET":
        return render_template("admin_login.html", next=nxt, error=None)
    client = "admin:" + _client()
    if (refused := refuse_if_too_many(client, "failed logins")) is not None:  # a wrong answer stays counted
        return refused
    if security.check_password(d.config.security.admin_password_hash, request.form.get("password", "")):
        d.login_limiter.reset(client)
        sign_in_admin()
        logger.info("admin login from %s", _client())
        return redirect(nxt, 303)
    logger.warning("failed admin login from %s", _client())
    return render_template("admin_login.html", next=nxt, error="Wrong password"), 401


@bp.post("/logout")
def logout():
    sign_out_admin()
    return redirect(url_for("pages.home"), 303)


@bp.route("/setup", methods=["GET", "POST"])
def setup():
    """First run only: choose the admin password, with the setup code from the service log."""
    d = deps()
    if d.config.security.admin_password_hash:
        return redirect(url_for("admin.login"))
    if request.method == "GET":
        return render_template("admin_setup.html", error=None)
    client = "setup:" + _client()
    if (refused := refuse_if_too_many(client, "wrong setup codes")) is not None:  # a wrong answer stays counted
        return refused
    if not security.setup_code_matches(d.setup_code, request.form.get("setup_code", "")):
        logger.warning("wrong first-run setup code from %s", _client())
        return render_template("admin_setup.html", error="Wrong setup code: copy it from the service log"), 403
    pw, again = request.form.get("password", ""), request.form.get("password2", "")
    if pw != again:
        return render_template("admin_setup.html", error="The two passwords differ"), 400
    with _setup_lock:
        if d.config.security.admin_password_hash:
            return redirect(url_for("admin.login"), 303)
        try:
            d.settings.update(d, {"security": {"admin_password_hash": security.hash_password(pw)}})
        except ValueError as exc:
            return render_template("admin_setup.html", error=str(exc).capitalize()), 400
        except SettingsNotSaved as exc:
            return render_template("admin_setup.html", error=str(exc)), exc.status
        d.setup_code = None  # the code is spent
    d.login_limiter.reset(client)
    logger.info("admin password chosen at first-run setup from %s (kept hashed in %s)", _client(), d.settings.path)
    sign_in_admin()
    return redirect(url_for("admin.index"), 303)
