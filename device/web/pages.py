"""HTML pages of the technician's workflow, images by ID, CSV export, PIN, health and metrics."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Iterator
from datetime import datetime

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    get_flashed_messages,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from werkzeug.exceptions import HTTPException

from device.service import ensure_crop, storage_writable
from device.slide import threshold_text
from device.store import EXCLUDE_REASONS, sample_key
from device.web import accept_pin, deps, error_response, health, pin_ok, refuse_if_too_many, security, views

logger = logging.getLogger(__name__)
bp = Blueprint("pages", __name__)


def _safe_next(target: str | None) -> str:
    """Only local paths: never redirect to another site."""
    return security.local_path(target) or url_for("pages.home")


# --- the workflow ---------------------------------------------------------------------------------

HISTORY_PAGE = 200  # slides per History page
HOME_OPEN = 50  # open slides listed on the start page; more are one click away (History, open only)


def _open_slides() -> dict:
    store = deps().store
    rows = store.list_slides(status="open", limit=HOME_OPEN)
    more = store.slide_counts()["open"] - len(rows)
    return {"open_slides": [views.slide_view(s) for s in rows], "more_open": max(0, more)}


@bp.get("/")
def home():
    return render_template("home.html", **_open_slides(), form={}, error=None)


@bp.post("/slides")
def new_slide():
    try:
        slide_id = views.start_slide(views.parse_new_slide(request.form))
    except views.FormError as exc:
        store = deps().store
        # the slide already open for this sample, linked even when it is not among the newest listed
        typed = sample_key(str(request.form.get("sample_id", "")).strip())
        already = next((s for s in store.list_slides(status="open", limit=10_000)
                        if typed and sample_key(s["sample_id"]) == typed), None)
        resp = render_template("home.html", **_open_slides(), form=request.form, error=str(exc),
            error_field=exc.field, already_open=views.slide_view(already) if already else None)
        return resp, 400
    return redirect(url_for("pages.slide", slide_id=slide_id), 303)


@bp.get("/slides/<int:slide_id>")
def slide(slide_id: int):
    s = views.slide_view(views.slide_or_404(slide_id))
    fields = deps().store.list_fields(slide_id)
    last = fields[-1] if fields else None
    overlap = views.overlap_warning(last) if last and s["status"] == "open" else None
    captured_id = request.args.get("captured", type=int)
    captured = next((f for f in fields if f["id"] == captured_id), None)
    return render_template("slide.html", slide=s, fields=fields, last=last, overlap=overlap, captured=captured)


@bp.post("/slides/<int:slide_id>/capture")
def capture(slide_id: int):
    field = views.capture(slide_id)
    # without the script: back at the Capture button with the answer beside it (the field's table row is
    # far below it on the 800x480 screen, and each capture meant scrolling back up)
    return redirect(url_for("pages.slide", slide_id=slide_id, captured=field["id"] if field else None,
                            _anchor="capture-form"), 303)


@bp.post("/slides/<int:slide_id>/finish")
def finish(slide_id: int):
    s = views.slide_view(views.slide_or_404(slide_id))
    a = s["automatic"]
    if s["status"] == "open" and a["rbc_count"] < a["target_rbc"] and request.form.get("confirm") != "1":
        # the script asks this in a dialog; without script the device asks (a page of its own, so that Back
        # later never offers to send a form again): a finished slide takes no more fields
        return redirect(url_for("pages.finish_question", slide_id=slide_id), 303)
    views.finish(slide_id)
    return redirect(url_for("pages.result", slide_id=slide_id), 303)


@bp.get("/slides/<int:slide_id>/finish")
def finish_question(slide_id: int):
    s = views.slide_view(views.slide_or_404(slide_id))
    if s["status"] != "open":
        return redirect(url_for("pages.result", slide_id=slide_id), 303)
    return render_template("finish_confirm.html", slide=s)


@bp.post("/slides/<int:slide_id>/discard")
def discard(slide_id: int):
    views.discard(slide_id)
    return redirect(url_for("pages.home"), 303)


@bp.route("/fields/<int:field_id>/exclude", methods=["GET", "POST"])
def exclude_field(field_id: int):
    """Take a captured field out of the count (wrong slide or area, an area counted twice): asks first."""
    f = deps().store.get_field(field_id)
    if f is None:
        abort(404, f"field {field_id} not found")
    if request.method == "POST":
        reason = request.form.get("reason", "")
        field = views.exclude_field(field_id, reason or "other")
        return redirect(url_for("pages.slide", slide_id=field["slide_id"], _anchor=f"field-{field_id}"), 303)
    slide = views.slide_or_404(f["slide_id"])
    if slide["status"] != "open":
        abort(409, f"slide {slide['sample_id']} is finished: its fields can no longer be changed")
    # a link may say why (the overlap warning: "same area counted twice"); else the first reason
    chosen = request.args.get("reason") if request.args.get("reason") in EXCLUDE_REASONS else EXCLUDE_REASONS[0]
    return render_template("exclude.html", field=views.field_json(f), slide=slide, reasons=EXCLUDE_REASONS,
                           chosen=chosen)


@bp.post("/fields/<int:field_id>/include")
def include_field(field_id: int):
    field = views.exclude_field(field_id, None)
    return redirect(url_for("pages.slide", slide_id=field["slide_id"], _anchor=f"field-{field_id}"), 303)


@bp.get("/slides/<int:slide_id>/review")
def review(slide_id: int):
    s = views.slide_view(views.slide_or_404(slide_id))
    store = deps().store
    # a decision refused without the page's script (changed in another window): said in that cell's tile,
    # where the redirect lands, not at the top of a gallery that may be 50 screens long
    said = get_flashed_messages(category_filter=["conflict"])
    cells, near = store.flagged_cells(slide_id), store.near_cells(slide_id)
    # a big slide's gallery runs to hundreds of tiles (57 screens at 800x480): "only those left" finds the rest
    left_only = request.args.get("left") == "1"
    if left_only:
        shown, shown_near = [c for c in cells if c["review"] is None], [c for c in near if c["review"] is None]
    else:
        shown, shown_near = cells, near
    conflict, said_on_top = None, []
    if said:
        conflict_id = request.args.get("conflict", type=int)
        if any(c["id"] == conflict_id for c in (*shown, *shown_near)):
            conflict = {"id": conflict_id, "message": said[0]}
        else:  # its tile is not drawn (its field taken out of the count meanwhile, or filtered): said on top
            said_on_top = said
    return render_template("review.html", slide=s, cells=shown, near=shown_near, n_flagged=len(cells),
                           n_near=len(near), left_only=left_only, conflict=conflict, said_on_top=said_on_top)


def _next_left(slide_id: int, cell_id: int) -> str | None:
    """The anchor of the next undecided cell after ``cell_id`` in the gallery's order (flagged, then near the
    threshold), else the first undecided one: where a reviewer showing only the cells left goes on."""
    store = deps().store
    order = [*store.flagged_cells(slide_id), *store.near_cells(slide_id)]
    ids = [c["id"] for c in order]
    start = ids.index(cell_id) + 1 if cell_id in ids else 0
    left = [c["id"] for c in order[start:] + order[:start] if c["review"] is None and c["id"] != cell_id]
    return f"cell-{left[0]}" if left else None


@bp.post("/cells/<int:cell_id>/review")
def review_cell(cell_id: int):
    decision, seen = request.form.get("decision"), request.form.get("seen")
    left = {"left": 1} if request.form.get("left") == "1" else {}  # the gallery showed only the cells left
    # The page's buttons always send both: a form without them (a stale or hand-made one) must neither clear a
    # decision someone made nor overwrite one changed in another window unseen.
    if decision not in ("confirmed", "rejected", "clear") or seen not in ("", "confirmed", "rejected"):
        abort(400, "the review form is incomplete: reload the page and press Parasite, Not a parasite or Undo")
    try:
        cell = views.review(cell_id, decision, seen)
    except HTTPException as exc:
        stored = deps().store.get_cell(cell_id)
        if exc.code != 409 or stored is None:
            raise
        # changed in another window meanwhile: back to the gallery, which shows what is stored, and why
        flash(exc.description, "conflict")
        return redirect(url_for("pages.review", slide_id=stored["slide_id"], conflict=cell_id,
                                _anchor=f"cell-{cell_id}", **left), 303)
    if left:  # the decided cell leaves the list: on to the next one left
        return redirect(url_for("pages.review", slide_id=cell["slide_id"], left=1,
                                _anchor=_next_left(cell["slide_id"], cell_id)), 303)
    return redirect(url_for("pages.review", slide_id=cell["slide_id"], _anchor=f"cell-{cell_id}"), 303)


@bp.get("/slides/<int:slide_id>/result")
def result(slide_id: int):
    s = views.slide_view(views.slide_or_404(slide_id))
    return render_template("result.html", slide=s)


@bp.get("/slides/<int:slide_id>/report")
def report(slide_id: int):
    s = views.slide_view(views.slide_or_404(slide_id))
    return render_template("report.html", slide=s, fields=deps().store.list_fields(slide_id),
                           printed_at=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M"))


@bp.get("/history")
def history():
    q = request.args.get("q", "").strip()[:64]
    only_open = request.args.get("open") == "1"
    try:
        page = min(max(0, int(request.args.get("page", "0"))), 10**6)  # past SQLite's integers: a 500
    except ValueError:
        page = 0
    rows = deps().store.list_slides(q, limit=HISTORY_PAGE + 1, offset=page * HISTORY_PAGE,
                                    status="open" if only_open else None)
    slides = [views.slide_view(s) for s in rows[:HISTORY_PAGE]]
    return render_template("history.html", slides=slides, q=q, only_open=only_open, page=page,
                           more=len(rows) > HISTORY_PAGE, page_size=HISTORY_PAGE)


# --- images, by ID only ---------------------------------------------------------------------------

@bp.get("/fields/<int:field_id>/<any(annotated, raw):kind>.jpg")
def field_image(field_id: int, kind: str):
    path = deps().store.field_image_path(field_id, kind)
    if path is None:
        abort(404, f"no {kind} image for field {field_id}")
    return _stored_jpeg(path)


@bp.get("/cells/<int:cell_id>/crop.jpg")
def cell_crop(cell_id: int):
    path = ensure_crop(deps().store, cell_id)
    if path is None:
        abort(404, f"no crop for cell {cell_id}")
    return _stored_jpeg(path)


def _stored_jpeg(path):
    """A stored image (found by ID, never by a path from the request); private: patient data.

    Asked again each time (no-cache, answered 304 while the file is the same: its ETag comes from the
    file): an ID can name another field after records are restored from an older copy, and a browser
    that kept /fields/13/annotated.jpg for an hour showed another patient's field under it."""
    resp = send_file(path, mimetype="image/jpeg", max_age=0, etag=True, conditional=True)
    resp.headers["Cache-Control"] = "private, no-cache"
    return resp


@bp.get("/preview.jpg")
def preview():
    """The live frame as a small JPEG; the page reloads it (one request per frame, no held thread)."""
    got = deps().camera.preview_jpeg()
    if got is None:
        return error_response(503, "no camera frame: the camera is not connected")
    seq, jpeg = got
    return Response(jpeg, mimetype="image/jpeg", headers={"Cache-Control": "no-store", "X-Frame-Seq": str(seq)})


# --- CSV ------------------------------------------------------------------------------------------

def _cell(v):
    """Spreadsheet-safe: text starting with = + - @ would run as a formula in Excel/LibreOffice."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


# UTF-8 with a byte-order mark: Excel, double-clicked, reads a CSV without one in the computer's old code page
# ("São-Tomé" became "SÃ£o-TomÃ©"); with it, as UTF-8. (Python reads it with encoding="utf-8-sig", pandas
# and LibreOffice as they are.)
CSV_BOM = "\ufeff"


def _csv_pieces(header: list[str], rows: Iterable[list]) -> Iterator[bytes]:
    """The CSV (byte-order mark, header, rows) in pieces of about CSV_CHUNK_BYTES, written as rows come."""
    buf = io.StringIO()
    buf.write(CSV_BOM)
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    for r in rows:
        w.writerow([_cell(v) for v in r])
        if buf.tell() >= CSV_CHUNK_BYTES:
            yield buf.getvalue().encode("utf-8")
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode("utf-8")


def _attachment(name: str) -> dict[str, str]:
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    return {"Content-Disposition": f'attachment; filename="malaria-detect-{name}-{stamp}.csv"'}


def _csv_response(name: str, header: list[str], rows: list[list]) -> Response:
    """A CSV built whole (a few thousand slides), sent with its length."""
    body = b"".join(_csv_pieces(header, rows))
    # In pieces: waitress then holds the view back while a slow client reads, instead of putting a
    # large body (years of fields) into a temporary file, which a full card would cut short.
    pieces = (body[i : i + CSV_CHUNK_BYTES] for i in range(0, len(body), CSV_CHUNK_BYTES))
    return Response(pieces, mimetype="text/csv", headers={**_attachment(name), "Content-Length": str(len(body))})


CSV_CHUNK_BYTES = 64 * 1024


def _csv_stream(name: str, header: list[str], rows: Iterable[list]) -> Response:
    """A CSV written as ``rows`` are read, in pieces of about CSV_CHUNK_BYTES: for the fields export, which
    after a year holds 200,000 rows (34 MB). Built whole, it took 343 MB more and two at once 582 MB, past
    the unit's memory limit; written as read, nothing measurable (tests/benchmarks/bench_export.py). Sent
    without a length: should the records fail part-way, the connection closes without the last piece and
    the browser marks the download failed rather than complete."""
    return Response(_csv_pieces(header, rows), mimetype="text/csv", headers=_attachment(name))


SLIDE_COLUMNS = [
    "slide_id", "sample_id", "patient_id", "operator", "status", "started_at", "finished_at",
    "fields_used", "fields_rejected", "rbc_count", "infected_count", "parasitemia_pct", "ci95_low_pct",
    "ci95_high_pct", "parasites_per_ul", "rbc_per_ul", "rbc_per_ul_source", "detection_limit_pct", "call",
    "reviewed_infected_count", "reviewed_parasitemia_pct", "reviewed_call", "review_confirmed",
    "review_rejected", "review_pending", "model_name", "model_sha256", "threshold", "notes", "fields_excluded",
    # what the call stood on: the flagged share (on a slide without a positive call it is the classifier's
    # false positives, so the density columns above stay empty), the target, the cutoff and the rate behind it
    "flagged_pct", "target_rbc", "positive_cutoff_cells", "fp_rate_per_cell", "expected_false_positives",
    "detection_limit_per_ul",
    # cells near the threshold shown for review (scored from review_floor up to the threshold; not counted
    # unless confirmed); empty for slides started before they were
    "review_floor", "near_threshold_cells", "near_confirmed", "near_rejected", "near_pending",
    # the result after review as the page and the report lead with it: its interval and density, empty
    # while flagged cells wait (as reviewed_parasitemia_pct) or without a positive call; meanwhile the
    # confirmed cells' share, a lower bound (the page's "≥ 0.193%")
    "reviewed_ci95_low_pct", "reviewed_ci95_high_pct", "reviewed_parasites_per_ul", "reviewed_ci95_low_per_ul",
    "reviewed_ci95_high_per_ul", "confirmed_pct", "confirmed_per_ul",
    # review decisions changed after the slide was finished (its filed result amended), and when the last was
    "review_changes_after_finish", "last_review_change_after_finish_at",
]


def csv_pct(v: float) -> str:
    """A percentage in the CSV: 4 decimals, and 3 significant digits below 0.01% (one parasite in 500,000 cells
    has a 95% interval from 0.000035%, which 4 decimals wrote as 0.0000: none)."""
    places = 4 if not 0 < v < 0.01 else 2 - math.floor(math.log10(v))
    return f"{v:.{places}f}"


@bp.get("/export/slides.csv")
def export_slides():
    rows = []
    status = "open" if request.args.get("open") == "1" else None  # as History showed them
    for s in deps().store.list_slides(request.args.get("q", "")[:64], limit=1_000_000, status=status):
        v = views.slide_view(s)
        a, r, rv, o = v["automatic"], v["reviewed"], v["totals"]["review"], v["review_open"]
        density = a["call"] == "positive"  # as the page: no parasitemia or parasites/uL without a positive call
        rows.append([
            v["id"], v["sample_id"], v["patient_id"], v["operator"], v["status"], v["started_at"],
            v["finished_at"] or "", a["fields_used"], a["fields_rejected"], a["rbc_count"], a["infected_count"],
            *([csv_pct(a['parasitemia_pct']), csv_pct(a['ci95_pct'][0]), csv_pct(a['ci95_pct'][1]),
               f"{a['parasites_per_ul']:.0f}"] if density else ["", "", "", ""]),
            f"{a['rbc_per_ul']:.0f}", a["rbc_per_ul_source"],
            csv_pct(a['detection_limit_pct']), a["call"], r["infected_count"],
            # while flagged cells wait for review the count after review still holds them: no density
            "" if rv["pending"] or r["call"] != "positive" else csv_pct(r['parasitemia_pct']),
            r["call"], rv["confirmed"], rv["rejected"], rv["pending"], v["model_name"], v["model_sha256"],
            threshold_text(v['threshold']), v["notes"], v["totals"].get("fields_excluded", 0),
            csv_pct(100.0 * a['infected_count'] / a['rbc_count']) if a["rbc_count"] else "", a["target_rbc"],
            a["positive_cutoff_cells"], f"{a['fp_rate_per_cell']:.6f}", f"{a['expected_false_positives']:.2f}",
            f"{a['detection_limit_per_ul']:.0f}",
            *(["", "", "", "", ""] if v["review_floor"] is None else [threshold_text(v['review_floor']), *(
                v["totals"]["near"][k] for k in ("cells", "confirmed", "rejected", "pending"))]),
            *(["", "", "", "", ""] if rv["pending"] or r["call"] != "positive" else [
                csv_pct(r['ci95_pct'][0]), csv_pct(r['ci95_pct'][1]), f"{r['parasites_per_ul']:.0f}",
                f"{r['ci95_per_ul'][0]:.0f}", f"{r['ci95_per_ul'][1]:.0f}"]),
            *(["", ""] if not o else [csv_pct(o['confirmed_pct']), f"{o['confirmed_per_ul']:.0f}"]),
            v["review_changes_after_finish"], v["last_review_change_after_finish_at"] or "",
        ])
    return _csv_response("slides", SLIDE_COLUMNS, rows)


FIELD_COLUMNS = [
    "field_id", "slide_id", "sample_id", "patient_id", "seq", "captured_at", "source", "width", "height",
    "rejected", "focus", "rbc_count", "infected_count", "model_sha256", "threshold", "analysis_ms",
    "excluded", "excluded_at",
]


@bp.get("/export/fields.csv")
def export_fields():
    raw = request.args.get("slide", "")
    slide_id = None
    if raw:  # one slide's fields; a bad number is refused, not read as "every slide"
        if not raw.isascii() or not raw.isdigit():
            abort(400, f"slide must be a slide number, got {raw[:40]!r}")
        slide_id = int(raw)
        if not 1 <= slide_id <= 2**63 - 1:  # past SQLite's rowids (OverflowError, a 500): an unknown slide
            abort(404, f"slide {raw[:40]} not found")
    rows = ([f["id"], f["slide_id"], f["sample_id"], f["patient_id"], f["seq"], f["captured_at"], f["source"],
             f["width"], f["height"], f["rejected"] or "", f"{f['focus']:.1f}", f["rbc_count"],
             f["infected_count"], f["model_sha256"], threshold_text(f['threshold']),
             json.loads(f["timing_json"] or "{}").get("total_ms", ""), f["excluded"] or "", f["excluded_at"] or ""]
            for f in deps().store.fields_for_export(request.args.get("q", "")[:64], slide_id,
                                                    status="open" if request.args.get("open") == "1" else None))
    return _csv_stream(f"slide{slide_id}-fields" if slide_id else "fields", FIELD_COLUMNS, rows)


# --- PIN ------------------------------------------------------------------------------------------

@bp.route("/pin", methods=["GET", "POST"])
def pin():
    d = deps()
    expected = d.config.security.technician_pin
    nxt = _safe_next(request.values.get("next"))
    if pin_ok():
        return redirect(nxt)
    if request.method == "GET":
        return render_template("pin.html", next=nxt, error=None)
    client = request.remote_addr or "?"
    if (refused := refuse_if_too_many("pin:" + client, "wrong PINs")) is not None:  # a wrong PIN stays counted
        return refused
    if security.tokens_match(expected, request.form.get("pin", "")):
        d.login_limiter.reset("pin:" + client)
        accept_pin()
        return redirect(nxt, 303)
    logger.warning("wrong technician PIN from %s", client)
    return render_template("pin.html", next=nxt, error="Wrong PIN"), 401


# --- health and metrics ---------------------------------------------------------------------------

@bp.get("/healthz")
def healthz():
    """For monitoring: 503 when the service cannot work (database, stuck capture loop), else 200.

    ``status`` is "ok", or "degraded" with ``warnings`` when it runs but cannot capture (no camera, model
    unusable, disk full) or saves less (disk low).
    """
    d = deps()
    problems, warnings = [], []
    try:
        d.store.pragma("user_version")
    except Exception as exc:  # any database failure means unhealthy
        problems.append(f"database: {exc}")
    if d.store.damage:  # found by the integrity check or met on a page: reads of other pages still work
        problems.append(f"records damaged: {d.store.damage}")
    read_only = storage_writable(d.store)
    if read_only:  # reads still work, so the database check above passes: nothing new can be saved
        problems.append(read_only)
    healthy = getattr(d.camera, "loop_healthy", lambda: True)
    if not healthy():
        problems.append("capture loop is not turning")
    cam = d.camera.status()
    if cam["state"] != "connected":
        warnings.append(f"camera {cam['state']}: {cam.get('message') or 'no frame yet'}")
    if not d.analyser.model.ok:
        warnings.append(f"model unusable: {d.analyser.model.error}")
    disk = d.analyser.disk()
    if disk.level != "ok":
        warnings.append(disk.message)
    body = {"status": "fail" if problems else "degraded" if warnings else "ok", "problems": problems,
            "warnings": warnings, "model_ok": d.analyser.model.ok, "camera": cam["state"], "disk": disk.level}
    return body, 503 if problems else 200


@bp.get("/metrics")
def metrics():
    d = deps()
    cam = d.camera.status()
    disk = d.analyser.disk()
    gauges = {
        "camera_connected": ("1 when the camera delivers usable frames.", 1.0 if cam["state"] == "connected" else 0.0),
        "camera_reconnects": ("Times the camera was lost since start.", float(cam.get("reconnects", 0))),
        "model_ok": ("1 when the model loaded and passed its card checks.", 1.0 if d.analyser.model.ok else 0.0),
        "analysis_pending": ("Fields being analysed or waiting.", float(d.analyser.pending)),
        "disk_free_bytes": ("Free space in the data folder.", round(disk.free_mb * 1e6)),
        "disk_low": ("1 below the low-disk level (raw frames not saved), 2 below the minimum (captures refused).",
                     {"ok": 0.0, "low": 1.0, "full": 2.0}[disk.level]),
        "uptime_seconds": ("Seconds since the service started.", d.uptime_s()),
    }
    temp = health.cpu_temperature_c()
    if temp is not None:
        gauges["cpu_temperature_celsius"] = ("CPU temperature.", temp)
    return Response(d.analyser.metrics.render(gauges), mimetype="text/plain; version=0.0.4")
