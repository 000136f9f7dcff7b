"""The local page and JSON API, built by :func:`create_app` from the parts it is handed.

The web layer is thin: routes read the request, call the store, the camera feed or the analyser, and
render. Analysis runs in the analyser's worker thread, so ``/api/status`` answers while a field is
analysed. All assets are local (the clinic is offline).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from flask import Flask, current_app, jsonify, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from device.slide import threshold_text
from device.web import health, security

logger = logging.getLogger(__name__)

MAX_UPLOAD_MB = 30  # a 12 MP camera PNG is ~25 MB; anything larger is not a microscope field
# Endpoints open without the technician PIN: monitoring, assets, the PIN page itself, and the admin
# pages, which have their own login.
PIN_EXEMPT = {"static", "pages.pin", "api.status", "api.session_info", "pages.healthz", "pages.metrics"}
# PIN, password and setup-code attempts from all clients together, a minute: a 4-digit PIN then takes hours to
# guess from any number of addresses, not minutes, while a clinic's own few sign-ins never meet it
LOGIN_ATTEMPTS_ALL_CLIENTS_PER_MINUTE = 30
ADMIN_SESSION_MAX_S = 12 * 3600  # an admin sign-in lasts a working day, then the password is asked again


@dataclass
class Deps:
    config: object  # the live config: the admin page replaces it when a setting changes
    store: object
    camera: object
    analyser: object
    settings: object  # device.service.AdminSettings: where admin changes are kept
    camera_opener: Callable  # camera config -> a callable that opens that camera
    login_limiter: security.RateLimiter
    admin_sessions: security.AdminSessions
    recent_log: health.RecentLog
    setup_code: str | None  # the first-run code printed to the log; None once a password is set
    # On the monotonic clock: setting the wall clock (a Pi boots with it behind) must not move the uptime.
    started_monotonic: float = field(default_factory=time.monotonic)

    def uptime_s(self) -> float:
        """Seconds since the service started."""
        return time.monotonic() - self.started_monotonic


def deps() -> Deps:
    from flask import current_app

    return current_app.extensions["malaria_detect"]


def wants_json() -> bool:
    if request.path.startswith("/api/"):
        return True
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


class RowIdConverter(IntegerConverter):
    """``<int:...>`` in every route: ids are SQLite rowids, so a number past 2^63 - 1 is a 404 like any
    unknown id (SQLite would raise OverflowError, a 500)."""

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(url_map, *args, **kwargs)


def create_app(config, store, camera, analyser, *, secret_key: bytes | None = None,
               camera_opener: Callable | None = None) -> Flask:
    """Build the Flask app.

    Args:
        config: the :class:`device.config.Config`, with the admin's ``settings.json`` already applied
            (:meth:`device.service.AdminSettings.apply`, as :func:`device.service.serve` does).
        store: a :class:`device.store.Store`.
        camera: a :class:`device.camera.CameraFeed` (or a fake with ``latest()``, ``status()``,
            ``preview_jpeg()``; ``reopen()`` for a camera change on the admin page).
        analyser: a :class:`device.service.FieldAnalyser` (or a fake with its interface).
        secret_key: the session key; None reads or creates ``secret_key`` in the data folder.
        camera_opener: camera config -> opener, for a camera change on the admin page
            (default :func:`device.service.camera_opener`).
    """
    from device.service import AdminSettings
    from device.service import camera_opener as default_opener

    app = Flask(__name__)
    data_dir = Path(store.data_dir)
    app.config.update(
        SECRET_KEY=secret_key or security.load_or_create_secret_key(data_dir),
        MAX_CONTENT_LENGTH=MAX_UPLOAD_MB * 1024 * 1024,
        SESSION_COOKIE_NAME="malaria_detect",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # No TLS on a clinic LAN: a Secure cookie would never be sent back.
        SESSION_COOKIE_SECURE=False,
        TEMPLATES_AUTO_RELOAD=False,
        JSON_SORT_KEYS=False,
    )
    setup_code = None
    if not config.security.admin_password_hash:
        setup_code = security.new_setup_code()
        # Printed, never stored: whoever can read the device's log owns it, not whoever opens the page first.
        logger.warning("FIRST RUN: no admin password is set. Setup code: %s (enter it at /admin/setup to "
                       "choose the password; a new code is made at every start until one is set)", setup_code,
                       extra={"not_a_problem": True})
    app.extensions["malaria_detect"] = Deps(
        config=config, store=store, camera=camera, analyser=analyser, settings=AdminSettings(data_dir),
        camera_opener=camera_opener or default_opener,
        login_limiter=security.RateLimiter(config.security.login_attempts_per_minute,
                                           total_per_minute=LOGIN_ATTEMPTS_ALL_CLIENTS_PER_MINUTE),
        admin_sessions=security.AdminSessions(ADMIN_SESSION_MAX_S),
        recent_log=health.install_recent_log(), setup_code=setup_code,
    )

    from device.web import admin, api, pages

    app.url_map.converters["int"] = RowIdConverter  # before the routes are added
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    _install_hooks(app)
    _install_filters(app)
    return app


CAPTURE_ENDPOINTS = ("api.capture", "pages.capture")


def _install_hooks(app: Flask) -> None:
    @app.before_request
    def _capture_is_received_from_its_first_byte():
        # Before the CSRF check below reads the form: for an upload without the page's script that parses
        # (spools) the whole body, and Finish pressed meanwhile must wait for this field, not close the
        # slide under it. Released when the request ends (teardown). What this cannot cover: waitress takes
        # the whole body in before it calls the app, so a file still on its way over the network is unseen
        # here. The page's script announces an upload before sending it (POST .../incoming, then the upload
        # with ?incoming=TOKEN), so Finish in any window waits for it, and keeps its own Finish disabled
        # until its capture or upload is answered. An upload without the script is not announced.
        if request.method == "POST" and request.endpoint in CAPTURE_ENDPOINTS and request.view_args:
            from device.web import views

            views.hold_receiving(request.view_args["slide_id"])

    @app.teardown_request
    def _capture_received(exc=None):
        from device.web import views

        views.release_receiving()

    @app.before_request
    def _csrf_and_pin():
        if security.CSRF_FIELD not in session:
            session[security.CSRF_FIELD] = security.new_csrf_token()
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            given = request.headers.get(security.CSRF_HEADER) or request.form.get(security.CSRF_FIELD)
            if not security.tokens_match(session.get(security.CSRF_FIELD), given):
                return error_response(400, "CSRF token missing or wrong: reload the page and try again")
        endpoint = request.endpoint or ""
        if endpoint not in PIN_EXEMPT and not endpoint.startswith("admin.") and not pin_ok():
            if wants_json():
                return error_response(401, "technician PIN required: reload the page to enter it")
            return redirect(url_for("pages.pin", next=request.full_path if request.method == "GET" else None))
        return None

    @app.after_request
    def _headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        if resp.mimetype in ("text/html", "application/json", "text/csv"):
            # Back after Finish showed the slide as open with a working Capture: pages are never cached; nor
            # are the CSV exports of patient IDs on a shared clinic computer
            resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'")
        return resp

    @app.context_processor
    def _globals():
        from device.web import views

        d = deps()
        return {"csrf_token": session.get(security.CSRF_FIELD, ""), "model": d.analyser.model,
                "camera_status": d.camera.status(), "pin_set": bool(d.config.security.technician_pin),
                "is_admin": admin_signed_in(), "disk": d.analyser.disk().to_json(),
                "clock": views.clock_status(), "records_damage": d.store.damage}

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            deps().analyser.metrics.inc("uploads_refused_total")
            return error_response(413, f"the upload is too large (at most {MAX_UPLOAD_MB} MB)")
        resp = error_response(exc.code or 500, exc.description or exc.name)
        if exc.code == 405:  # RFC 9110: a 405 names the methods that are allowed
            allow = dict(exc.get_headers()).get("Allow")
            if allow:
                resp.headers["Allow"] = allow
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        from device.service import storage_problem
        from device.store import is_damage

        if is_damage(exc):  # a damaged page met outside a transaction: no more writes, /healthz fails
            deps().store.mark_damaged(str(exc))
        problem = storage_problem(exc)
        if problem:  # a full, read-only or damaged card: said as such, not as an internal error
            logger.error("%s %s: %s (%s)", request.method, request.path, problem, exc)
            return error_response(507, problem)
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal error: see the service log")


# --- who is signed in -------------------------------------------------------------------------------

def _matches(stored, value: str) -> bool:
    return isinstance(stored, str) and hmac.compare_digest(stored, security.fingerprint(current_app.secret_key,
                                                                                        value))


def admin_signed_in() -> bool:
    """The session signed in with the current admin password, less than ADMIN_SESSION_MAX_S ago, and has not
    signed out since (a copy of its cookie included)."""
    d = deps()
    h = d.config.security.admin_password_hash
    at = session.get("admin_at")
    if not h or not isinstance(at, int | float) or not 0 <= time.time() - at <= ADMIN_SESSION_MAX_S:
        return False
    return _matches(session.get("admin"), "admin:" + h) and d.admin_sessions.alive(session.get("admin_sid"))


def sign_in_admin() -> None:
    """Mark the session with the current password hash's fingerprint and the time.

    The rest of the session (the technician's PIN and CSRF token) is kept: the session is a signed
    cookie, so a copy taken before sign-in never gains the admin mark (no fixation), and a technician's
    slide open in another tab of the same browser must go on capturing (clearing it broke every capture
    there with "CSRF token missing or wrong").
    """
    d = deps()
    password_hash = d.config.security.admin_password_hash
    d.admin_sessions.end(session.get("admin_sid"))  # signing in again replaces this browser's old sign-in
    session["admin_sid"] = d.admin_sessions.start()
    session["admin"] = security.fingerprint(current_app.secret_key, "admin:" + password_hash)
    session["admin_at"] = time.time()
    session.setdefault(security.CSRF_FIELD, security.new_csrf_token())


def sign_out_admin() -> None:
    """End the admin sign-in on the device (copies of the cookie too) and drop the mark; a technician's PIN
    and open slide in another tab stay usable."""
    deps().admin_sessions.end(session.pop("admin_sid", None))
    session.pop("admin", None)
    session.pop("admin_at", None)


def pin_ok() -> bool:
    """No PIN is configured, or this session entered the current one (or is an admin's)."""
    pin = deps().config.security.technician_pin
    return not pin or _matches(session.get("pin_ok"), "pin:" + pin) or admin_signed_in()


def accept_pin() -> None:
    session["pin_ok"] = security.fingerprint(current_app.secret_key, "pin:" + deps().config.security.technician_pin)
    session.setdefault(security.CSRF_FIELD, security.new_csrf_token())  # other tabs keep theirs working


def refuse_if_too_many(key: str, what: str):
    """Count a sign-in attempt by ``key`` before it is checked (a slow password hash in parallel threads
    cannot let many through): None, or the 429 to answer. A right answer then calls
    ``deps().login_limiter.reset(key)``."""
    wait, everyone = deps().login_limiter.acquire(key)
    if wait:
        return error_response(429, security.too_many(what, wait, everyone), retry_after_s=wait)
    return None


def error_response(status: int, message: str, **extra):
    """A JSON error for the API and fetch(), an HTML page for a browser."""
    if wants_json():
        resp = jsonify({"error": message, "status": status, **extra})
    else:
        resp = app_render("error.html", status=status, message=message)
    resp.status_code = status
    if status == 429 and "retry_after_s" in extra:
        resp.headers["Retry-After"] = str(extra["retry_after_s"])
    return resp


def app_render(template: str, **ctx):
    from flask import make_response

    return make_response(render_template(template, **ctx))


def local_time_text(iso: str | None) -> str:
    """A stored UTC time as the device's pages show it: the device's time zone, not the browser's (a row
    added by script and the same row after a reload must read alike)."""
    return health.local_text(datetime.fromisoformat(iso)) if iso else ""


def pct_text(v: float | None, apart_from: float | None = None) -> str:
    """A percentage as every page shows it, and as ``fmtPct`` in static/app.js does after a capture.

    Three decimals, and two significant digits below 0.01% (one confirmed parasite in 60,000 cells has an
    interval of 0.00029% – 0.0094%, which three decimals printed as "0.000% – 0.009%": possibly none); more
    where it would read the same as ``apart_from``, a different figure shown beside it. Ties
    round up, on the float's exact value, as JavaScript's toFixed does (Python's format rounds them to
    even: 1 in 1,600 cells read 0.062% on the page and 0.063% after the next capture).
    """
    if v is None:
        return "—"
    places = 3
    if 0 < v < 0.01:
        places = min(12, 1 - math.floor(math.log10(v)))

    def text(x: float, p: int) -> str:
        return f"{Decimal(x).quantize(Decimal(1).scaleb(-p), rounding=ROUND_HALF_UP):f}%"

    if apart_from is not None and apart_from != v:
        # two figures shown side by side that differ must read apart: 632 flagged cells in 105,950 (0.5965%)
        # beside the 633 of the detection limit (0.5975%) both read "0.597%"
        while places < 12 and text(v, places) == text(apart_from, places):
            places += 1
    return text(v, places)


def _install_filters(app: Flask) -> None:
    app.add_template_filter(local_time_text, "localtime")

    app.add_template_filter(pct_text, "pct")
    app.add_template_filter(threshold_text, "threshold")

    @app.template_filter("thousands")
    def _thousands(v: float | None) -> str:
        return "—" if v is None else f"{v:,.0f}"

    @app.template_global()
    def call_class(call: str) -> str:
        return {"positive": "call-pos", "negative": "call-neg"}.get(call, "call-wait")
