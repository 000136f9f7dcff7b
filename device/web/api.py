"""The JSON API beside the pages: status, slides, capture/upload, review, finish.

POSTs need the session's CSRF token in the ``X-CSRF-Token`` header (``GET /api/session`` gives it).
"""

from __future__ import annotations

from flask import Blueprint, abort, jsonify, request, session

from device.web import deps, error_response, pin_ok, security, views

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/status")
def status():
    return jsonify(views.status_json())


@bp.get("/session")
def session_info():
    pin = bool(deps().config.security.technician_pin)
    return jsonify({"csrf_token": session.get(security.CSRF_FIELD), "pin_required": pin,
                    "pin_ok": pin_ok()})  # the current PIN's, as every other endpoint checks it


@bp.get("/slides")
def slides():
    q = request.args.get("q", "").strip()[:64]
    limit = min(max(request.args.get("limit", 100, type=int), 1), 1000)
    return jsonify({"slides": [views.slide_json(s) for s in deps().store.list_slides(q, limit=limit)]})


def _object_body():
    """The request's JSON object or form; 400 for anything else (a JSON list, string, number, invalid)."""
    data = request.get_json(silent=True) if request.is_json else request.form
    if data is None or not hasattr(data, "get"):
        abort(400, "expected a JSON object or a form")
    return data


@bp.post("/slides")
def new_slide():
    data = _object_body()
    try:
        slide_id = views.start_slide(views.parse_new_slide(data))
    except views.FormError as exc:
        # the slide already open for this sample: the page (or a script) can continue it
        extra = {} if exc.open_slide_id is None else {"open_slide_id": exc.open_slide_id}
        return error_response(exc.status, str(exc), **extra)
    return jsonify(views.slide_json(views.slide_or_404(slide_id))), 201


@bp.get("/slides/<int:slide_id>")
def slide(slide_id: int):
    return jsonify(views.slide_json(views.slide_or_404(slide_id), with_fields=True))


@bp.post("/slides/<int:slide_id>/fields")
def capture(slide_id: int):
    """Capture the live frame, or analyse the uploaded ``image`` (multipart); 201 with the field."""
    field = views.capture(slide_id)
    slide = views.slide_json(views.slide_or_404(slide_id))
    if field is None:
        return jsonify({"pending": True, "slide": slide,
                        "message": "still analysing: the field will appear in the list"}), 202
    out = views.field_json(field)
    out["overlap"] = views.overlap_warning(field)
    return jsonify({"field": out, "slide": slide}), 201


@bp.post("/slides/<int:slide_id>/incoming")
def incoming(slide_id: int):
    """An upload is about to be sent: 201 with a token for its ``?incoming=`` (Finish waits for it while the
    sender renews it every ``renew_s``)."""
    return jsonify(views.announce_upload(slide_id)), 201


@bp.post("/slides/<int:slide_id>/incoming/<token>/renew")
def incoming_renew(slide_id: int, token: str):
    """The announced file is still on its way: Finish goes on waiting for it."""
    return jsonify(views.renew_announcement(slide_id, token))


@bp.post("/slides/<int:slide_id>/incoming/<token>/withdraw")
def incoming_withdraw(slide_id: int, token: str):
    """The announced file will not come (its sending failed): Finish need not wait for it."""
    return jsonify(views.renew_announcement(slide_id, token, withdraw=True))


@bp.get("/slides/<int:slide_id>/cells")
def flagged_cells(slide_id: int):
    views.slide_or_404(slide_id)
    store = deps().store
    return jsonify({"cells": [views.cell_json(c) for c in store.flagged_cells(slide_id)],
                    "near_threshold": [views.cell_json(c) for c in store.near_cells(slide_id)]})


@bp.post("/slides/<int:slide_id>/finish")
def finish(slide_id: int):
    views.finish(slide_id)
    return jsonify(views.slide_json(views.slide_or_404(slide_id)))


@bp.post("/slides/<int:slide_id>/discard")
def discard(slide_id: int):
    """Delete an open slide with no fields (started by mistake)."""
    slide = views.discard(slide_id)
    return jsonify({"discarded": slide["id"], "sample_id": slide["sample_id"]})


@bp.get("/fields/<int:field_id>")
def field(field_id: int):
    f = deps().store.get_field(field_id)
    if f is None:
        abort(404, f"field {field_id} not found")
    out = views.field_json(f)
    out["cells"] = [views.cell_json(c) for c in deps().store.field_cells(field_id)]
    return jsonify(out)


@bp.post("/fields/<int:field_id>/exclude")
def exclude_field(field_id: int):
    """{"reason": one of the reasons} takes the field out of the count; {"reason": null} counts it again."""
    body = _object_body()
    if "reason" not in body:  # {} counted the field again without a word
        abort(400, 'say "reason": one of the reasons to exclude the field, or null to count it again')
    reason = body["reason"]
    if reason is not None and not isinstance(reason, str):
        abort(400, "reason must be text or null")
    field = views.exclude_field(field_id, reason)
    return jsonify({"field": views.field_json(field),
                    "slide": views.slide_json(views.slide_or_404(field["slide_id"]))})


@bp.post("/cells/<int:cell_id>/review")
def review(cell_id: int):
    body = _object_body()
    seen = body.get("seen")
    if seen is not None and seen not in ("", "confirmed", "rejected"):
        abort(400, "seen must be '', 'confirmed' or 'rejected'")
    if "decision" not in body:  # an empty body must not clear a decision someone made
        abort(400, 'say the decision: "confirmed", "rejected", or null to clear it')
    cell = views.review(cell_id, body["decision"], seen)
    slide = views.slide_json(views.slide_or_404(cell["slide_id"]))
    return jsonify({"cell": views.cell_json(cell), "slide": slide})
