"""The admin pages: first-run password setup, login (rate-limited), a read-only device overview.

Settings changes belong to the admin issue; this is the frame it builds on (``admin_required``).
"""

from __future__ import annotations

import functools
import logging
import platform
import shutil
import sys

from flask import Blueprint, redirect, render_template, request, session, url_for

from device.web import deps, error_response, security, views

logger = logging.getLogger(__name__)
bp = Blueprint("admin", __name__, url_prefix="/admin")


def admin_required(view):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not session.get("admin"):
            if not deps().admin_password.is_set:
                return redirect(url_for("admin.setup"))
            return redirect(url_for("admin.login", next=request.path))
        return view(*args, **kwargs)
    return wrapper


@bp.get("/")
@admin_required
def index():
    d = deps()
    cfg = d.config
    store = d.store
    disk = shutil.disk_usage(store.data_dir)
    slides = store.list_slides(limit=1_000_000)
    info = {
        "Data folder": str(store.data_dir),
        "Disk free": f"{disk.free / 1e9:.1f} GB of {disk.total / 1e9:.1f} GB",
        "Database schema": f"version {store.schema_version}",
        "Slides": f"{len(slides)} ({sum(s['status'] == 'open' for s in slides)} open)",
        "Camera source": cfg.camera.source,
        "Counting target": f"{cfg.analysis.counting_target_rbc} red cells",
        "Assumed RBC/µL": f"{cfg.analysis.rbc_per_ul:,.0f}",
        "Technician PIN": "set" if cfg.security.technician_pin else "not set (pages open on the LAN)",
        "Listening on": f"{cfg.service.host}:{cfg.service.port}",
        "Python": f"{sys.version.split()[0]} on {platform.machine()}",
    }
    return render_template("admin.html", info=info, status=views.status_json(),
                           metrics=d.analyser.metrics.counts)


@bp.route("/login", methods=["GET", "POST"])
def login():
    d = deps()
    if not d.admin_password.is_set:
        return redirect(url_for("admin.setup"))
    nxt = request.values.get("next") or url_for("admin.index")
    if not nxt.startswith("/admin") or nxt.startswith("//"):
        nxt = url_for("admin.index")
    if request.method == "GET":
        return render_template("admin_login.html", next=nxt, error=None)
    client = "admin:" + (request.remote_addr or "?")
    wait = d.login_limiter.retry_after_s(client)
    if wait:
        return error_response(429, f"too many failed logins: try again in {wait} s", retry_after_s=wait)
    if d.admin_password.check(request.form.get("password", "")):
        d.login_limiter.reset(client)
        session.clear()  # a fresh session on login: no fixation
        session["admin"] = True
        session[security.CSRF_FIELD] = security.new_csrf_token()
        logger.info("admin login from %s", request.remote_addr)
        return redirect(nxt, 303)
    d.login_limiter.failed(client)
    logger.warning("failed admin login from %s", request.remote_addr)
    return render_template("admin_login.html", next=nxt, error="Wrong password"), 401


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("pages.home"), 303)


@bp.route("/setup", methods=["GET", "POST"])
def setup():
    """First run only: choose the admin password (stored hashed, 0600, in the data folder)."""
    d = deps()
    if d.admin_password.is_set:
        return redirect(url_for("admin.login"))
    if request.method == "GET":
        return render_template("admin_setup.html", error=None)
    pw, again = request.form.get("password", ""), request.form.get("password2", "")
    error = None
    if pw != again:
        error = "The two passwords differ"
    else:
        try:
            d.admin_password.set_first(pw)
        except ValueError as exc:
            error = str(exc).capitalize()
        except (PermissionError, FileExistsError):
            return redirect(url_for("admin.login"))
    if error:
        return render_template("admin_setup.html", error=error), 400
    session.clear()
    session["admin"] = True
    session[security.CSRF_FIELD] = security.new_csrf_token()
    return redirect(url_for("admin.index"), 303)
