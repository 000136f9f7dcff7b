"""The admin page over the LAN: device health, last problems, settings (validated, kept, applied), password,
and the monitoring endpoints /healthz and /metrics. Flask test client on real parts."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime, timedelta

import cv2
import pytest

from device import service
from device.config import THRESHOLD_SAFE_RANGE
from device.web import admin as admin_views
from device.web import health, pages
from tests.conftest import (
    ADMIN_PASSWORD,
    SAMPLES_DIR,
    admin_hash,
    damage_a_page,
    live_server,
    make_config,
    wait_until,
)

SAMPLE = sorted(SAMPLES_DIR.glob("*.jpg"))[0]


def _env(make_env, **sections):
    security = {"admin_password_hash": admin_hash(), **sections.pop("security", {})}
    return make_env(security=security, **sections)



def _save(c, token, **form):
    return c.post("/admin/settings", data={"counting_target_rbc": "2000", "threshold": "", "camera_source": "replay",
                                           "camera_device": "0", **form, "csrf_token": token})


def _upload(c, token, slide_id, data=None, name="f.jpg"):
    return c.post(f"/api/slides/{slide_id}/fields", headers={"X-CSRF-Token": token},
                  data={"image": (io.BytesIO(data or SAMPLE.read_bytes()), name)}, content_type="multipart/form-data")


# --- health -------------------------------------------------------------------------------------------

def _zone(root, n, kind, milli):
    z = root / f"thermal_zone{n}"
    z.mkdir(parents=True)
    (z / "type").write_text(kind + "\n")
    (z / "temp").write_text(f"{milli}\n")


def test_cpu_temperature_prefers_the_cpu_zone_and_says_when_there_is_none(tmp_path):
    _zone(tmp_path / "pi", 0, "gpu-thermal", 61000)
    _zone(tmp_path / "pi", 1, "cpu-thermal", 48750)
    assert health.cpu_temperature_c(tmp_path / "pi") == 48.75
    _zone(tmp_path / "other", 0, "iwlwifi_1", 39000)
    assert health.cpu_temperature_c(tmp_path / "other") == 39.0  # no CPU zone: the first readable one
    (tmp_path / "none").mkdir()
    assert health.cpu_temperature_c(tmp_path / "none") is None
    mem = health.memory_mb()
    assert mem is None or 0 < mem[0] <= mem[1]
    assert health.format_duration(90061) == "1 d 1 h 1 min" and health.format_duration(None) == "not available"


def test_admin_page_shows_device_health_model_and_last_problems(make_env, monkeypatch, tmp_path):
    env = _env(make_env)
    c, token = env.admin_client()
    _zone(tmp_path / "thermal", 0, "cpu-thermal", 52300)
    monkeypatch.setattr(health, "THERMAL_DIR", tmp_path / "thermal")
    logging.getLogger("device.camera").warning("camera lost: test cable pulled")
    html = c.get("/admin/").get_data(as_text=True)
    m = env.analyser.model
    for text in ("CPU temperature", "52.3 °C", "Load (1 / 5 / 15 min)", "Memory available", "Disk free", "Uptime",
                 "malaria-detect 0.1.0", "Listening on", "127.0.0.1:8080", m.name, m.sha256, "Validation (card)",
                 "specificity", "Camera", "Last problems", "camera lost: test cable pulled", "Counters"):
        assert text in html, text
    assert "Setup code" not in html  # the first-run code is not a problem to list
    # the shipped card chose its threshold on the validation cells: the page says so beside the figures
    assert "Threshold chosen" in html and "measured on the cells it was chosen on" in html
    assert html.split('id="model-views">')[1].split("</dd>")[0] == "1: each cell as it is"
    members = json.loads((SAMPLES_DIR.parents[1] / "models" / "cellnet_int8.json").read_text())["members"]["count"]
    assert html.split('id="model-members">')[1].split("</dd>")[0] == (
        f"{members}: each score is the mean of {members} trained models (inside the model, one pass each)"
        if members > 1 else "1: one trained model")
    floor = html.split('id="review-floor">')[1].split("</dd>")[0]
    assert "cells scored from 0.7 up to the threshold are shown for review" in floor
    env.analyser.set_threshold(0.6)  # at or below the floor: a slide started now shows none
    floor = c.get("/admin/").get_data(as_text=True).split('id="review-floor">')[1].split("</dd>")[0]
    assert floor.startswith("none shown for review (the threshold is at or below the floor, 0.7)")
    env.analyser.set_threshold(None)
    monkeypatch.setattr(health, "THERMAL_DIR", tmp_path / "nowhere")
    html = c.get("/admin/").get_data(as_text=True)
    assert re.search(r"CPU temperature</dt><dd>not available", html)


def test_recent_log_keeps_the_last_warnings_newest_first():
    log = health.RecentLog(capacity=3)
    lg = logging.getLogger("test.recent")
    lg.addHandler(log)
    lg.propagate = False
    try:
        lg.setLevel(logging.INFO)
        lg.info("not kept")
        for i in range(5):
            lg.warning("warning %d", i)
        try:
            raise OSError("disk gone")
        except OSError:
            lg.exception("write failed")
        lg.warning("setup code", extra={"not_a_problem": True})
    finally:
        lg.removeHandler(log)
    entries = log.entries()
    assert [e.message for e in entries] == ["write failed (OSError: disk gone)", "warning 4", "warning 3"]
    assert entries[0].level == "ERROR" and entries[1].logger == "test.recent"


# --- settings -----------------------------------------------------------------------------------------

def test_settings_are_validated_kept_in_the_data_folder_and_applied_at_once(make_env):
    env = _env(make_env)
    c, token = env.admin_client()
    tech = env.app.test_client()
    ttoken = env.csrf(tech)
    r = tech.post("/api/slides", json={"sample_id": "BEFORE"}, headers={"X-CSRF-Token": ttoken})
    assert r.status_code == 201 and r.get_json()["target_rbc"] == 2000
    before_threshold = r.get_json()["threshold"]

    r = _save(c, token, counting_target_rbc="1500", threshold="0.61", technician_pin="4821")
    assert r.status_code == 303
    html = c.get(r.headers["Location"]).get_data(as_text=True)
    assert "Saved:" in html and "technician PIN set" in html and "4821" not in html
    settings = env.store.data_dir / "settings.json"
    stored = json.loads(settings.read_text())
    assert stored == {"analysis": {"counting_target_rbc": 1500}, "model": {"threshold": 0.61},
                      "security": {"technician_pin": "4821"}}
    assert oct(settings.stat().st_mode & 0o777) == "0o600"
    # applied now: the PIN to technician pages, target and threshold to new slides
    assert tech.get("/history").status_code == 302
    assert tech.post("/pin", data={"pin": "4821", "csrf_token": ttoken}).status_code == 303
    ttoken = env.csrf(tech)
    new = tech.post("/api/slides", json={"sample_id": "AFTER"}, headers={"X-CSRF-Token": ttoken}).get_json()
    assert new["target_rbc"] == 1500 and new["threshold"] == 0.61 and env.analyser.model.threshold == 0.61
    # an open slide keeps its threshold: its new fields are classified with it
    field = _upload(tech, ttoken, 1).get_json()["field"]
    assert field["threshold"] == before_threshold != 0.61
    # a restart applies settings.json over the config file, validated the same way
    cfg = service.AdminSettings(env.store.data_dir).apply(make_config(env.store.data_dir))
    assert (cfg.analysis.counting_target_rbc, cfg.model.threshold, cfg.security.technician_pin) == (1500, 0.61, "4821")


@pytest.mark.parametrize("form, message", [
    ({"counting_target_rbc": "50"}, "analysis.counting_target_rbc: 50 outside 100-100000"),
    ({"counting_target_rbc": "lots"}, "not a whole number"),
    ({"threshold": "0.2"}, f"model.threshold: 0.2 outside the safe range {THRESHOLD_SAFE_RANGE[0]}"),
    ({"threshold": "1.5"}, "outside the safe range"),
    ({"threshold": "high"}, "not a number"),
    ({"camera_source": "webcam"}, "camera.source"),
    ({"camera_source": "opencv", "camera_device": "video0"}, "camera.device: &#39;video0&#39; is not a camera index"),
    ({"technician_pin": "12ab"}, "security.technician_pin: must be 4-12 digits"),
])
def test_invalid_settings_are_refused_naming_the_setting_and_nothing_is_kept(make_env, form, message):
    env = _env(make_env)
    c, token = env.admin_client()
    r = _save(c, token, **form)
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert message in html and 'id="settings-error"' in html
    assert not (env.store.data_dir / "settings.json").exists()
    assert env.deps.config.analysis.counting_target_rbc == 2000 and env.deps.config.model.threshold is None


def test_camera_source_change_reopens_the_camera(make_env):
    env = _env(make_env)
    c, token = env.admin_client()
    assert wait_until(lambda: env.feed.status()["state"] == "connected")
    r = _save(c, token, camera_source="opencv", camera_device="/dev/no-such-video")
    assert r.status_code == 303
    assert wait_until(lambda: env.feed.status()["state"] == "disconnected")
    st = env.feed.status()
    assert st["source"] == "opencv" and "no camera at '/dev/no-such-video'" in st["message"]
    assert _save(c, token, camera_source="replay", camera_device="0").status_code == 303
    assert wait_until(lambda: env.feed.status()["state"] == "connected" and env.feed.latest() is not None)
    assert "camera" not in json.loads((env.store.data_dir / "settings.json").read_text()) or \
        json.loads((env.store.data_dir / "settings.json").read_text())["camera"]["source"] == "replay"


def test_removing_the_pin_opens_the_technician_pages_again(make_env):
    env = _env(make_env, security={"technician_pin": "2468"})
    c, token = env.admin_client()
    tech = env.app.test_client()
    assert tech.get("/history").status_code == 302
    assert 'id="remove_pin"' in c.get("/admin/").get_data(as_text=True)
    assert _save(c, token, remove_pin="1").status_code == 303
    assert tech.get("/history").status_code == 200


def test_changing_the_pin_signs_the_technicians_out(make_env):
    """A PIN changed (it was seen, or a technician left) must be asked again of every browser."""
    env = _env(make_env, security={"technician_pin": "4821"})
    c, token = env.admin_client()
    tech = env.app.test_client()
    ttoken = tech.get("/api/session").get_json()["csrf_token"]
    assert tech.post("/pin", data={"pin": "4821", "csrf_token": ttoken}).status_code == 303
    assert tech.get("/history").status_code == 200 and tech.get("/api/slides").status_code == 200
    assert _save(c, token, technician_pin="9999").status_code == 303
    r = tech.get("/history")
    assert r.status_code == 302 and r.headers["Location"].startswith("/pin")
    assert tech.get("/api/slides").status_code == 401
    # and the page's script is told so: /api/session said pin_ok true (an old PIN's sign-in) while every
    # other endpoint refused the session
    assert tech.get("/api/session").get_json()["pin_ok"] is False
    ttoken = tech.get("/api/session").get_json()["csrf_token"]
    assert tech.post("/pin", data={"pin": "9999", "csrf_token": ttoken}).status_code == 303
    assert tech.get("/api/session").get_json()["pin_ok"] is True


def test_password_change_needs_the_current_one_and_signs_out_other_sessions(make_env):
    env = _env(make_env, security={"login_attempts_per_minute": 3})
    c, token = env.admin_client()
    other, _ = env.admin_client()
    form = {"current": ADMIN_PASSWORD, "password": "new-password-1", "password2": "new-password-1", "csrf_token": token}
    r = c.post("/admin/password", data={**form, "current": "wrong"})
    assert r.status_code == 401 and "current password is wrong" in r.get_data(as_text=True)
    assert c.post("/admin/password", data={**form, "password2": "other-one-2"}).status_code == 400
    r = c.post("/admin/password", data={**form, "password": "short", "password2": "short"})
    assert r.status_code == 400 and "8 characters" in r.get_data(as_text=True)
    assert c.post("/admin/password", data=form).status_code == 303
    assert c.get("/admin/").status_code == 200  # this session stays signed in
    assert other.get("/admin/").headers["Location"].startswith("/admin/login")  # the other one is out
    stored = (env.store.data_dir / "settings.json").read_text()
    assert "new-password-1" not in stored
    assert json.loads(stored)["security"]["admin_password_hash"].startswith("scrypt:")
    fresh = env.app.test_client()
    ftoken = env.csrf(fresh)
    assert fresh.post("/admin/login", data={"password": ADMIN_PASSWORD, "csrf_token": ftoken}).status_code == 401
    assert fresh.post("/admin/login", data={"password": "new-password-1", "csrf_token": ftoken}).status_code == 303


# --- monitoring ---------------------------------------------------------------------------------------

PROM_LINE = re.compile(r'^[a-z_]+(\{le="[^"]+"\})? -?[0-9.e+]+$|^# (HELP|TYPE) [a-z_]+ .+$')


def test_metrics_count_fields_cells_rejections_errors_latency(make_env, monkeypatch):
    env = _env(make_env)
    c, token = env.admin_client()
    c.post("/api/slides", json={"sample_id": "M-1"}, headers={"X-CSRF-Token": token})
    assert _upload(c, token, 1).status_code == 201
    # another field, out of focus (a blurred copy of the first is that field again: "already counted")
    other = sorted(SAMPLE.parent.glob("*.jpg"))[2]
    blurred = cv2.imencode(".png", cv2.GaussianBlur(cv2.imread(str(other)), (0, 0), 6))[1].tobytes()
    assert _upload(c, token, 1, blurred, "blurred.png").get_json()["field"]["rejected"]
    assert _upload(c, token, 1, b"not an image", "x.png").status_code == 400

    def broken(*_a, **_k):
        raise RuntimeError("segmentation blew up")

    monkeypatch.setattr(service, "analyze_field", broken)
    r = _upload(c, token, 1, sorted(SAMPLE.parent.glob("*.jpg"))[1].read_bytes())  # a new field: not counted yet
    assert r.status_code == 500 and "segmentation blew up" in r.get_json()["error"]
    text = c.get("/metrics").get_data(as_text=True)
    assert all(PROM_LINE.match(line) for line in text.strip().splitlines()), text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["malaria_fields_analysed_total"] == 2 and values["malaria_fields_rejected_total"] == 1
    assert values["malaria_cells_total"] > 10 and values["malaria_analysis_errors_total"] == 1
    assert values["malaria_uploads_refused_total"] == 1
    assert values['malaria_analysis_latency_seconds_bucket{le="+Inf"}'] == 2
    assert values["malaria_analysis_latency_seconds_count"] == 2
    for name in ("malaria_disk_free_bytes", "malaria_disk_low", "malaria_uptime_seconds", "malaria_model_ok",
                 "malaria_camera_connected", "malaria_captures_refused_total", "malaria_raw_frames_skipped_total"):
        assert name in values, name
    # and in the last problems (logged by the future's callback, a moment after the answer)
    assert wait_until(lambda: "segmentation blew up" in c.get("/admin/").get_data(as_text=True), 5)


def test_uptime_does_not_move_when_the_clock_is_set(make_env, monkeypatch):
    """A Pi boots with its clock behind and an admin sets it (or one that ran ahead is set back): the
    service's uptime read off the wall clock went negative ("service -1 d 0 h 0 min")."""
    env = _env(make_env)
    c, _ = env.admin_client()

    class DayBehind(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) - timedelta(days=1)

    for module in (admin_views, pages):
        monkeypatch.setattr(module, "datetime", DayBehind)
    text = c.get("/metrics").get_data(as_text=True)
    up = float(re.search(r"^malaria_uptime_seconds (\S+)$", text, re.M).group(1))
    assert 0 <= up < 600
    html = c.get("/admin/").get_data(as_text=True)
    since = (datetime.now() - timedelta(days=1)).strftime("%Y-%m-%d")  # the start, on the clock as set now
    assert re.search(r"service \d+ h \d+ min \(since " + since, html), re.search(r"service [^<]*", html)[0]


def test_healthz_is_ok_degraded_or_failing(make_env, monkeypatch):
    env = make_env(model_ok=False, security={"admin_password_hash": admin_hash()})
    admin, _ = env.admin_client()
    html = admin.get("/admin/").get_data(as_text=True)
    assert "unusable" in html and "model file missing" in html  # the admin page says why, too
    c = env.app.test_client()
    r = c.get("/healthz")
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "degraded"
    assert any("model unusable" in w for w in body["warnings"])

    def db_gone(_name):
        raise OSError("disk I/O error")

    monkeypatch.setattr(env.store, "pragma", db_gone)
    r = c.get("/healthz")
    assert r.status_code == 503 and r.get_json()["status"] == "fail" and "database" in r.get_json()["problems"][0]


def test_read_only_or_full_storage_is_said_as_such_and_fails_healthz(make_env, monkeypatch):
    """A card remounted read-only answered Finish and Review with a bare 500 "internal error" while
    /healthz said ok; a full disk did the same on the pages that write without the capture's check."""
    import os
    import sqlite3

    from device import service

    env = make_env()
    c = env.app.test_client()
    token = env.csrf(c)
    assert c.post("/slides", data={"sample_id": "RO-1", "csrf_token": token}).status_code == 303
    for message, said in (("attempt to write a readonly database", "read-only"),
                          ("database or disk is full", "storage is full")):
        def fail(*args, message=message, **kwargs):
            raise sqlite3.OperationalError(message)

        monkeypatch.setattr(env.store, "finish_slide", fail)
        r = c.post("/api/slides/1/finish", headers={"X-CSRF-Token": token})
        assert r.status_code == 507 and said in r.get_json()["error"] and "nothing was saved" in r.get_json()["error"]
    assert env.store.get_slide(1)["status"] == "open"
    real_access = os.access
    monkeypatch.setattr(service.os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    r = c.get("/healthz")
    assert r.status_code == 503 and any("read-only" in p for p in r.get_json()["problems"])


def _records_banner(html: str) -> str:
    return re.search(r'<div[^>]*id="records-banner"[^>]*>', html)[0]


@pytest.mark.parametrize("found_by", ["a page", "the backup's check"])
def test_damaged_records_are_said_as_such_stop_writes_and_fail_healthz(make_env, found_by):
    """A page of the records damaged by a failing card: the slide page answered a bare 500 "internal error",
    /healthz said ok (it read only the schema version) and new slides went on being written into the file.
    Then a capture ran the whole analysis and answered 500 "analysis failed", a page already open never
    showed the damage, and a backup whose check found it answered a bare 500 and marked nothing."""
    from tests.test_store import add_fields

    env = _env(make_env)
    c = env.app.test_client()
    token = env.csrf(c)
    assert c.post("/slides", data={"sample_id": "DMG-1", "csrf_token": token}).status_code == 303
    add_fields(env.store, 1, env.store.get_slide(1)["model_sha256"])
    assert c.get("/healthz").get_json()["status"] != "fail"
    assert c.get("/api/status").get_json()["records_damage"] is None
    assert "hidden" in _records_banner(c.get("/").get_data(as_text=True))
    if found_by == "a page":
        damage_a_page(env.store, "cells")
        r = c.get("/slides/1")  # reads the damaged page
        assert r.status_code == 507 and "records are damaged" in r.get_data(as_text=True)
        heading = r.get_data(as_text=True).split("<h1>")[1].split("</h1>")[0]
        assert heading == "Storage problem"  # every 507 was headed "Disk full", damaged records too
    else:  # a page whose count of free bytes is wrong: every read works, only a check finds it
        damage_a_page(env.store, "cells", how="fragmented")
        assert c.get("/slides/1").status_code == 200
        admin, _ = env.admin_client()
        r = admin.get("/admin/backup", buffered=True)
        assert r.status_code == 507 and "records are damaged" in r.get_data(as_text=True)
    assert env.store.damage
    r = c.get("/healthz")
    assert r.status_code == 503 and any("records damaged" in p for p in r.get_json()["problems"])
    assert c.get("/api/status").get_json()["records_damage"] == env.store.damage  # an open page shows it
    r = c.post("/slides", data={"sample_id": "DMG-2", "csrf_token": token})
    assert r.status_code == 507 and "restore the last backup" in r.get_data(as_text=True)
    files = sorted(env.store.images_dir.rglob("*"))
    r = _upload(c, token, 1)  # refused before the analysis and before its images are written
    assert r.status_code == 507 and "records are damaged" in r.get_json()["error"], r.get_json()
    assert sorted(env.store.images_dir.rglob("*")) == files
    metrics = c.get("/metrics").get_data(as_text=True)
    assert re.search(r"^malaria_captures_refused_total 1(\.0)?$", metrics, re.M)
    assert re.search(r"^malaria_analysis_errors_total 0(\.0)?$", metrics, re.M)
    home = c.get("/").get_data(as_text=True)
    assert "hidden" not in _records_banner(home) and "nothing new can be saved" in home
    assert [s["sample_id"] for s in env.store.list_slides()] == ["DMG-1"]


def test_settings_that_cannot_be_written_say_so_and_change_nothing(make_env, monkeypatch):
    import errno

    from device import service

    env = _env(make_env)
    c, token = env.admin_client()
    before = env.analyser.model.threshold

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(service, "write_atomic", disk_full)
    r = _save(c, token, threshold="0.6")
    assert r.status_code == 507  # was a bare 500 "internal error"
    assert "Not saved: cannot write" in r.get_data(as_text=True) and "No space left" in r.get_data(as_text=True)
    assert env.analyser.model.threshold == before
    r = c.post("/admin/password", data={"current": ADMIN_PASSWORD, "password": "a-new-long-pass",
                                        "password2": "a-new-long-pass", "csrf_token": token})
    assert r.status_code == 507 and "Not saved" in r.get_data(as_text=True)


def test_a_threshold_the_model_card_gives_no_false_positive_rate_for_is_refused(make_env, monkeypatch):
    from device.model_card import ModelCard

    env = _env(make_env)
    c, token = env.admin_client()
    before = env.analyser.model.threshold
    card = env.analyser.classifier.card  # the shipped card, its operating curve cut to start at 0.8
    short = ModelCard(card.path, {**card.data, "operating_curve": [
        r for r in card.data["operating_curve"] if r["threshold"] >= 0.8]})
    monkeypatch.setattr(env.analyser.classifier, "card", short)
    start = min(r["threshold"] for r in short.data["operating_curve"])
    r = _save(c, token, threshold="0.6")
    assert r.status_code == 400
    said = r.get_data(as_text=True)
    assert f"gives no false-positive rate at threshold 0.6 (its operating curve starts at {start:g})" in said
    assert env.analyser.model.threshold == before and env.deps.config.model.threshold is None
    assert _save(c, token, threshold="0.85").status_code == 303  # on the curve: saved
    assert env.analyser.model.threshold == 0.85


def test_saving_another_setting_keeps_a_threshold_with_more_digits_than_shown(make_env):
    # more than 8 decimals: a computed score, not a typed threshold (those are shown whole)
    env = _env(make_env, model={"threshold": 0.978875012345})
    c, token = env.admin_client()
    assert 'value="0.97887"' in c.get("/admin/").get_data(as_text=True)  # shown rounded down, 5 decimals
    r = _save(c, token, counting_target_rbc="3000", threshold="0.97887")  # the form sent back untouched
    assert r.status_code == 303
    # was re-saved rounded (and new slides got another false-positive rate with it)
    assert "Saved: counting target 3000 red cells." in c.get("/admin/").get_data(as_text=True)
    assert "threshold" not in env.store.data_dir.joinpath("settings.json").read_text()


# --- the clock ----------------------------------------------------------------------------------------

def _model_made_long_ago(env, monkeypatch):
    """The card's date well before this machine's clock, whatever that reads: these tests are about records."""
    import dataclasses

    monkeypatch.setattr(env.analyser, "model", dataclasses.replace(env.analyser.model,
                                                                   card_date="2026-01-01T00:00:00+00:00"))


def test_clock_problem_names_the_time_the_clock_must_be_past():
    from datetime import UTC, datetime, timedelta

    made = datetime(2026, 11, 30, 2, 54, tzinfo=UTC)
    record = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
    assert health.clock_problem(record + timedelta(hours=1), record, made) is None
    # a network time correction of a few minutes is no problem
    assert health.clock_problem(record - timedelta(minutes=5), record, made) is None
    night_off = health.clock_problem(record - timedelta(hours=14), record, made)
    assert night_off and "earlier than its newest record" in night_off
    assert "2027-03-01" in night_off  # the record's date, so the admin sees how far behind
    epoch = health.clock_problem(datetime(1970, 1, 1, tzinfo=UTC), None, made)
    assert epoch and "earlier than the date its model was made" in epoch
    assert health.clock_problem(datetime(1970, 1, 1, tzinfo=UTC), None, None) is None  # nothing to compare


def test_a_clock_behind_the_records_is_shown_to_technician_and_admin(make_env, monkeypatch):
    from datetime import timedelta

    env = _env(make_env)
    _model_made_long_ago(env, monkeypatch)
    c, token = env.admin_client()
    assert c.post("/api/slides", json={"sample_id": "S-CLOCK"}, headers={"X-CSRF-Token": token}).status_code == 201
    newest = env.store.newest_record_time()
    assert newest is not None and abs((newest - health.wall_clock()).total_seconds()) < 60
    # a right clock (set, so that the test does not depend on this machine's clock and the card's date)
    monkeypatch.setattr(health, "wall_clock", lambda: newest + timedelta(minutes=1))
    status = c.get("/api/status").get_json()["clock"]
    assert status["problem"] is None and status["now"]
    html = c.get("/").get_data(as_text=True)
    assert 'id="clock-banner"' not in html
    assert "compare it with your watch" in c.get("/admin/").get_data(as_text=True)
    # the Pi was off overnight without network: its clock resumed from the last shutdown
    monkeypatch.setattr(health, "wall_clock", lambda: newest - timedelta(hours=9))
    status = c.get("/api/status").get_json()["clock"]
    assert status["problem"] and "earlier than its newest record" in status["problem"]
    html = c.get("/").get_data(as_text=True)
    assert 'id="clock-banner"' in html and "Check the device clock" in html
    admin = c.get("/admin/").get_data(as_text=True)
    assert "CHECK" in admin and "sudo date -s" in admin and 'id="clock-confirm"' in admin
    # counting goes on: a field is still captured and counted
    r = _upload(c, token, 1)
    assert r.status_code in (200, 201, 202), r.get_data(as_text=True)
    # Free space reads "N days ago" on this clock: refused until it is set or confirmed
    r = c.post("/admin/free-space", data={"days": "0", "csrf_token": token})
    assert r.status_code == 303 and "nothing was deleted" in c.get("/admin/").get_data(as_text=True)


def test_an_admin_confirms_a_right_clock_behind_records_dated_by_a_clock_that_ran_ahead(make_env, monkeypatch):
    from datetime import timedelta

    env = _env(make_env)
    _model_made_long_ago(env, monkeypatch)
    c, token = env.admin_client()
    right_now = health.wall_clock()
    # a year typed wrongly: records dated a year ahead...
    monkeypatch.setattr(health, "wall_clock", lambda: right_now + timedelta(days=365))
    from device import store as store_mod

    monkeypatch.setattr(store_mod, "utc_now", lambda: (right_now + timedelta(days=365)).isoformat(timespec="seconds"))
    assert c.post("/api/slides", json={"sample_id": "S-AHEAD"}, headers={"X-CSRF-Token": token}).status_code == 201
    monkeypatch.undo()
    # ...then the clock was corrected: it is right, the records are ahead
    monkeypatch.setattr(health, "wall_clock", lambda: right_now)
    assert c.get("/api/status").get_json()["clock"]["can_confirm"] is True
    assert c.post("/admin/clock-ok", data={}).status_code == 400  # CSRF token required
    assert env.app.test_client().post("/admin/clock-ok").status_code in (400, 401)
    def confirm(browser_time):
        form = {"csrf_token": token, "browser_time_ms": "" if browser_time is None else
                str(int(browser_time.timestamp() * 1000))}
        assert c.post("/admin/clock-ok", data=form).status_code == 303
        return c.get("/admin/").get_data(as_text=True)

    # the admin's computer disagrees (the device clock is hours behind after a night off): not confirmed
    assert "Set the device clock instead" in confirm(right_now + timedelta(hours=9))
    assert "needs your computer" in confirm(None)  # no time sent (script off): not confirmed either
    assert c.get("/api/status").get_json()["clock"]["can_confirm"] is True
    assert "Noted: the clock is right" in confirm(right_now + timedelta(seconds=40))
    clock = c.get("/api/status").get_json()["clock"]
    assert clock["problem"] is None and clock["can_confirm"] is False
    assert 'id="clock-banner"' not in c.get("/").get_data(as_text=True)
    # kept in the database: across a restart, and in a backup (a restored copy carries its own)
    from device.store import Store

    again = Store(env.store.data_dir)
    try:
        assert again.newest_record_time() is None
    finally:
        again.close()
    # a clock behind the model's date is wrong for sure: nothing to confirm
    made = datetime.fromisoformat(env.analyser.model.card_date)
    monkeypatch.setattr(health, "wall_clock", lambda: made - timedelta(days=400))
    clock = c.get("/api/status").get_json()["clock"]
    assert "model was made" in clock["problem"] and clock["can_confirm"] is False
    assert 'id="clock-confirm"' not in c.get("/admin/").get_data(as_text=True)
    assert "nothing to confirm" in confirm(made - timedelta(days=400))


def test_the_records_download_is_for_the_admin_and_is_a_whole_database(make_env, tmp_path):
    import sqlite3

    env = _env(make_env)
    anonymous = env.app.test_client()
    r = anonymous.get("/admin/backup")
    assert r.status_code == 302 and "/admin/login" in r.headers["Location"]  # patient records: admin only
    c, token = env.admin_client()
    assert c.post("/api/slides", json={"sample_id": "S-BACKUP"}, headers={"X-CSRF-Token": token}).status_code == 201
    assert _upload(c, token, 1).status_code in (200, 201, 202)
    assert wait_until(lambda: env.store.slide_counts()["fields"] == 1, 30)
    admin_page = c.get("/admin/").get_data(as_text=True)
    assert 'href="/admin/backup"' in admin_page
    assert re.search(r"1 slides \(1 open\), 1 fields; database \d+\.\d MB", admin_page)  # what a copy will take
    r = c.get("/admin/backup", buffered=True)
    assert r.status_code == 200 and r.mimetype == "application/vnd.sqlite3"
    disposition = r.headers["Content-Disposition"]
    assert re.search(r"attachment; filename=malaria-detect-records-\d{8}-\d{4}\.sqlite", disposition)
    copy = tmp_path / "download.sqlite"
    copy.write_bytes(r.data)
    db = sqlite3.connect(copy)
    try:
        assert db.execute("SELECT sample_id FROM slides").fetchall() == [("S-BACKUP",)]
        assert db.execute("SELECT COUNT(*) FROM fields").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == env.store.list_fields(1)[0]["rbc_count"]
    finally:
        db.close()


def test_the_admin_frees_space_by_deleting_old_raw_frames_and_keeps_the_results(make_env, monkeypatch):
    from datetime import timedelta

    env = _env(make_env)
    c, token = env.admin_client()
    assert c.post("/api/slides", json={"sample_id": "S-SPACE"}, headers={"X-CSRF-Token": token}).status_code == 201
    assert _upload(c, token, 1).status_code in (200, 201, 202)
    assert wait_until(lambda: env.store.slide_counts()["fields"] == 1, 30)
    field = env.store.list_fields(1)[0]
    assert field["has_raw"], "the test config keeps raw frames"
    assert c.post("/api/slides/1/finish", headers={"X-CSRF-Token": token}, json={"confirm": True}).status_code == 200
    html = c.get("/admin/").get_data(as_text=True)
    assert re.search(r'id="raw-frames-finished">1<', html) and re.search(r'id="raw-frames-old">0<', html)
    # a finished slide newer than the days asked for keeps its raw frame
    r = c.post("/admin/free-space", data={"days": "30", "csrf_token": token})
    assert r.status_code == 303
    assert "raw frames of 0 fields" in c.get("/admin/").get_data(as_text=True)
    assert c.get(f"/fields/{field['id']}/raw.jpg").status_code == 200
    for bad in ("-1", "ten", "99999"):
        c.post("/admin/free-space", data={"days": bad, "csrf_token": token})
        page = c.get("/admin/").get_data(as_text=True)
        assert "nothing was deleted" in page, bad
        assert 'class="msg msg-error" role="alert" id="admin-flash"' in page  # a refusal does not look like success
    assert c.post("/admin/free-space", data={"days": "0"}).status_code == 400  # CSRF token required
    assert env.app.test_client().post("/admin/free-space", data={"days": "0"}).status_code in (400, 401)
    # a month later
    later = health.wall_clock() + timedelta(days=31)
    monkeypatch.setattr(health, "wall_clock", lambda: later)
    assert re.search(r'id="raw-frames-old">1<', c.get("/admin/").get_data(as_text=True))
    with monkeypatch.context() as m:  # a failing card: the crops cannot be made durable, nothing goes
        m.setattr(service, "sync_filesystem", lambda p: (_ for _ in ()).throw(OSError(5, "Input/output error")))
        c.post("/admin/free-space", data={"days": "30", "csrf_token": token})
        assert "nothing was deleted" in c.get("/admin/").get_data(as_text=True)
    assert c.get(f"/fields/{field['id']}/raw.jpg").status_code == 200
    c.post("/admin/free-space", data={"days": "30", "csrf_token": token})
    assert "raw frames of 1 fields" in c.get("/admin/").get_data(as_text=True)
    assert c.get(f"/fields/{field['id']}/raw.jpg").status_code == 404
    assert c.get(f"/fields/{field['id']}/annotated.jpg").status_code == 200
    slide = c.get("/api/slides/1").get_json()
    assert slide["status"] == "finished" and slide["automatic"]["rbc_count"] == field["rbc_count"]
    assert slide["fields"][0]["raw_url"] is None and slide["fields"][0]["rbc_count"] == field["rbc_count"]
    # the annotated fields too, when asked: the counts, cells and flagged-cell crops stay
    html = c.get("/admin/").get_data(as_text=True)
    assert re.search(r'id="annotated-finished">1<', html) and re.search(r'id="annotated-old">1<', html)
    c.post("/admin/free-space", data={"days": "30", "annotated": "1", "csrf_token": token})
    html = c.get("/admin/").get_data(as_text=True)
    assert "annotated images of 1 fields" in html and re.search(r'id="annotated-finished">0<', html)
    assert c.get(f"/fields/{field['id']}/annotated.jpg").status_code == 404
    slide = c.get("/api/slides/1").get_json()
    assert slide["fields"][0]["annotated_url"] is None and slide["automatic"]["rbc_count"] == field["rbc_count"]
    page = c.get("/slides/1").get_data(as_text=True)
    assert f'href="/fields/{field["id"]}/annotated.jpg"' not in page and "(no picture)" in page
    crops = [x["crop_url"] for x in c.get("/api/slides/1/cells").get_json()["cells"] if x["crop_url"]]
    assert all(c.get(u).status_code == 200 for u in crops)


def test_free_space_reaches_slides_finished_while_the_clock_ran_ahead(make_env, monkeypatch):
    """A slide finished while the clock ran ahead is dated in the future: once the admin had confirmed the
    clock, Free space never reached it, not even with 0 days, and said "0 fields" without a reason."""
    import time as _time
    from datetime import UTC

    import device.store as store_module

    env = _env(make_env)
    c, token = env.admin_client()
    h = {"X-CSRF-Token": token}
    assert c.post("/api/slides", json={"sample_id": "S-AHEAD"}, headers=h).status_code == 201
    assert _upload(c, token, 1).status_code == 201
    ahead = store_module._utc_text(datetime.now(UTC) + timedelta(days=200))
    with monkeypatch.context() as m:
        m.setattr(store_module, "utc_now", lambda: ahead)
        assert c.post("/api/slides/1/finish", headers=h, json={"confirm": True}).status_code == 200
    assert env.store.get_slide(1)["finished_at"] == ahead
    r = c.post("/admin/clock-ok", data={"csrf_token": token, "browser_time_ms": str(int(_time.time() * 1000))})
    assert r.status_code == 303 and c.get("/api/status").get_json()["clock"]["problem"] is None
    field_id = env.store.list_fields(1)[0]["id"]
    c.post("/admin/free-space", data={"days": "30", "csrf_token": token})
    html = c.get("/admin/").get_data(as_text=True)
    assert "raw frames of 0 fields" in html and "1 fields of slides dated after now" in html
    assert c.get(f"/fields/{field_id}/raw.jpg").status_code == 200
    c.post("/admin/free-space", data={"days": "0", "csrf_token": token})
    assert "raw frames of 1 fields" in c.get("/admin/").get_data(as_text=True)
    assert c.get(f"/fields/{field_id}/raw.jpg").status_code == 404


def test_the_records_download_needs_no_disk_and_a_large_one_checks_its_space_first(make_env, monkeypatch):
    import sqlite3
    import tempfile

    from device.web import admin

    env = _env(make_env)
    c, token = env.admin_client()
    assert c.post("/api/slides", json={"sample_id": "S-FULL"}, headers={"X-CSRF-Token": token}).status_code == 201

    def no_temp_space(*a, **kw):
        raise OSError(28, "No space left on device")

    # a full (or read-only) card is when the records matter most: the copy is made in memory
    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_temp_space)
    for _ in range(2):  # one after the other: the first released its turn
        r = c.get("/admin/backup", buffered=True)  # read whole and closed, as the server does
        assert r.status_code == 200 and r.data[:16] == b"SQLite format 3\x00" and r.data[18:20] == b"\x01\x01"
    monkeypatch.undo()
    # a database too large for memory goes through a temporary file, if the disk can take it
    monkeypatch.setattr(admin, "BACKUP_IN_MEMORY_MAX_BYTES", 0)
    r = c.get("/admin/backup", buffered=True)
    assert r.status_code == 200 and r.data[:16] == b"SQLite format 3\x00"
    monkeypatch.setattr(service, "free_disk_mb", lambda _p: 0.01)  # less than the records' size
    r = c.get("/admin/backup", buffered=True)
    assert r.status_code == 507 and "not enough free space to copy the records" in r.get_data(as_text=True)
    monkeypatch.undo()
    # one copy at a time (each holds the size of the records)
    turn = env.app.extensions["malaria_detect_backup_turn"]
    held = [io.BytesIO(b"a paused download's copy")]
    assert turn.take(held)
    turn.copied(held)
    assert c.get("/admin/backup", buffered=True).status_code == 409
    turn.stale_s = 0.0  # the paused download has sent nothing for longer than that: its turn goes
    r = c.get("/admin/backup", buffered=True)
    assert r.status_code == 200 and held == []  # and its copy is let go
    assert r.status_code == 200
    db = sqlite3.connect(":memory:")
    db.deserialize(r.data)
    assert db.execute("SELECT sample_id FROM slides").fetchall() == [("S-FULL",)]


def test_a_large_records_download_reaches_a_slow_client_whole_on_a_full_card(make_env, monkeypatch):
    """On the real server: what a slow client has not read stays in memory (waitress would spill it to a
    temporary file past 1 MB, which on a full card cut the download off after 1 MB under a 200 OK)."""
    import http.client
    import sqlite3
    import time

    import waitress
    import waitress.buffers

    env = _env(make_env)
    db = sqlite3.connect(env.store.db_path)
    with db:
        db.execute("INSERT INTO slides (id, sample_id, status, started_at, model_name, model_sha256, threshold,"
                   " fp_rate_per_cell, target_rbc, rbc_per_ul) VALUES (1, 'BIG', 'open', '2026-11-30T08:00:00+00:00',"
                   " 'm', ?, 0.9, 0.001, 2000, 5e6)", ("a" * 64,))
        for fid in range(1, 31):
            db.execute("INSERT INTO fields (id, slide_id, seq, captured_at, source, width, height, focus, rbc_count,"
                       " infected_count, model_sha256, threshold, file_key) VALUES (?, 1, ?, "
                       "'2026-11-30T08:00:00+00:00', 'camera', 1280, 960, 4, 2000, 0, ?, 0.9, 'k')",
                       (fid, fid, "a" * 64))
            db.executemany("INSERT INTO cells (field_id, idx, x, y, w, h, p_infected, infected) VALUES"
                           " (?, ?, ?, ?, 60, 60, 0.01, 0)", [(fid, i, i, i) for i in range(2000)])
    db.close()
    assert env.store.database_bytes() > 2 * 1024 * 1024  # well past waitress's 1 MB default
    monkeypatch.setattr(waitress.buffers.TempfileBasedBuffer, "newfile",
                        lambda self: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with live_server(env.app, **service.WAITRESS_SETTINGS) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=30)
        conn.request("GET", "/api/session")
        r = conn.getresponse()
        cookie = r.getheader("Set-Cookie").split(";")[0]
        token = json.loads(r.read())["csrf_token"]
        conn.request("POST", "/admin/login", body=f"password={ADMIN_PASSWORD}&csrf_token={token}",
                     headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        assert r.status == 303
        cookie = r.getheader("Set-Cookie").split(";")[0]
        conn.request("GET", "/admin/backup", headers={"Cookie": cookie})
        r = conn.getresponse()
        time.sleep(1.5)  # a slow client: the server has written what it may meanwhile
        body = r.read()
        assert r.status == 200 and len(body) == int(r.getheader("Content-Length")) > 2 * 1024 * 1024
        copy = sqlite3.connect(":memory:")
        copy.deserialize(body)
        assert copy.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 60_000


def test_a_download_whose_turn_was_taken_stops_and_lets_its_copy_go():
    from device.web.admin import BACKUP_CHUNK_BYTES, BackupTurn, _chunks

    turn = BackupTurn(stale_s=60.0)
    image = b"SQLite format 3\x00" + bytes(2) + b"\x02\x02" + bytes(3 * BACKUP_CHUNK_BYTES)
    box = [image]
    assert turn.take(box)
    turn.stale_s = 0.0
    assert not turn.take([b"next"])  # while its copy is being made, a download is never stalled
    turn.stale_s = 60.0
    turn.copied(box)
    stream = _chunks(box, turn)
    first = next(stream)
    assert first[18:20] == b"\x01\x01" and len(first) == BACKUP_CHUNK_BYTES  # opens without a -wal
    assert not turn.take([b"next"])  # an active download keeps its turn
    turn.stale_s = 0.0
    nxt = [b"next"]
    assert turn.take(nxt)  # a stalled one gives it up...
    assert box == [] and list(stream) == []  # ...its copy goes and it sends no more
    turn.copied(nxt)
    # while the given-up download's connection is open (its server thread waits on the paused client), no
    # other turn is given up: at most one thread waits so
    assert not turn.take([b"third"])
    turn.give_back(box)  # the server closed the paused download
    assert turn.take([b"third"])
    whole = [image]
    turn2 = BackupTurn()
    assert turn2.take(whole)
    turn2.copied(whole)
    assert b"".join(_chunks(whole, turn2)) == image[:18] + b"\x01\x01" + image[20:]


def test_a_settings_page_loaded_before_another_admins_change_does_not_undo_it(make_env):
    env = _env(make_env)
    one, t1 = env.admin_client()
    two, t2 = env.admin_client()
    page_two = two.get("/admin/").get_data(as_text=True)  # loaded first, showing target 2000
    shown = dict(re.findall(r'name="shown_([a-z_]+)" value="([^"]*)"', page_two))
    assert shown["counting_target_rbc"] == "2000"
    form = {"counting_target_rbc": "3000", "threshold": shown["threshold"], "camera_source": shown["camera_source"],
            "camera_device": shown["camera_device"]}
    assert one.post("/admin/settings", data={**form, **{f"shown_{k}": v for k, v in shown.items()},
                                             "csrf_token": t1}).status_code == 303
    stored = json.loads((env.store.data_dir / "settings.json").read_text())
    assert stored["analysis"]["counting_target_rbc"] == 3000
    # window two changes only the camera device; its target field still says 2000, as its page showed
    stale = {**form, "counting_target_rbc": "2000", "camera_device": "1",
             **{f"shown_{k}": v for k, v in shown.items()}, "csrf_token": t2}
    assert two.post("/admin/settings", data=stale).status_code == 303
    stored = json.loads((env.store.data_dir / "settings.json").read_text())
    assert stored["analysis"]["counting_target_rbc"] == 3000 and stored["camera"]["device"] == "1"


def _password_change_beside_a_settings_save(env, monkeypatch, slow):
    """Admin A changes the password while admin B saves counting target 1500 (``slow``: where A's request
    waits, so that B's lands inside it). Returns both answers."""
    import threading
    import time

    a, ta = env.admin_client()
    b, tb = env.admin_client()
    slow(monkeypatch)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("pw", a.post("/admin/password", data={
        "current": ADMIN_PASSWORD, "password": "new-password-1", "password2": "new-password-1", "csrf_token": ta})))
    t.start()
    time.sleep(0.25)
    out["settings"] = _save(b, tb, counting_target_rbc="1500")
    t.join(10)
    return out["pw"], out["settings"]


def _slow_hash(monkeypatch):  # the password hash takes a good part of a second on a Pi
    import time

    from device.web import security

    real = security.hash_password
    monkeypatch.setattr(security, "hash_password", lambda pw: (real(pw), time.sleep(0.5))[0])


def _slow_password_write(monkeypatch):  # the settings file's fsync on an SD card, for the password's write
    import time

    real = service.write_atomic

    def write(path, data, **kw):
        real(path, data, **kw)
        if b"admin_password_hash" in data and b"counting_target_rbc" not in data:
            time.sleep(0.5)

    monkeypatch.setattr(service, "write_atomic", write)


@pytest.mark.parametrize("slow", [_slow_hash, _slow_password_write], ids=["hashing", "writing"])
def test_a_password_change_and_a_settings_save_at_once_both_hold_in_the_running_service(make_env, monkeypatch, slow):
    """Each request validated its change over the live config it read before the settings lock, and assigned
    the result after it: both reached settings.json, but the later assignment took the other change out of
    the running service (the counting target back to 2000, or the old password working again and the new
    one refused) until the next restart, while the page said "Saved" to both."""
    env = _env(make_env)
    pw, saved = _password_change_beside_a_settings_save(env, monkeypatch, slow)
    assert pw.status_code == 303 and saved.status_code == 303
    stored = json.loads((env.store.data_dir / "settings.json").read_text())
    assert stored["analysis"]["counting_target_rbc"] == 1500
    assert env.deps.config.analysis.counting_target_rbc == 1500
    assert env.deps.config.security.admin_password_hash == stored["security"]["admin_password_hash"]

    def signs_in(password):
        c = env.app.test_client()
        return c.post("/admin/login", data={"password": password, "csrf_token": env.csrf(c)}).status_code == 303

    assert (signs_in(ADMIN_PASSWORD), signs_in("new-password-1")) == (False, True)


def test_a_model_converted_with_views_or_members_says_so_on_the_admin_page(make_env, tmp_path):
    """A card made by `convert --views 4` lists the flips each cell's score averages, one from `convert --model
    A B C` the trained models it averages; the admin sees how many passes a cell costs. A card without the
    entries is one view of one model."""
    import shutil
    from pathlib import Path

    from device.classifier import CellClassifier
    from device.service import FieldAnalyser
    from device.store import Store

    model = Path(__file__).resolve().parent.parent / "models" / "cellnet_int8.tflite"
    shutil.copy(model, tmp_path / model.name)
    card = json.loads(model.with_suffix(".json").read_text())
    card.pop("views", None)
    card.pop("members", None)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model, bare / model.name)
    (bare / "cellnet_int8.json").write_text(json.dumps(card))
    card["views"] = {"count": 4, "views": ["as it is", "mirrored", "upside down", "both flips"]}
    card["members"] = {"count": 3, "models": [{"model": f"runs/r{i}/model.keras"} for i in range(3)]}
    (tmp_path / "cellnet_int8.json").write_text(json.dumps(card))
    analyser = FieldAnalyser(Store(tmp_path / "data"), CellClassifier(tmp_path / model.name))
    assert analyser.model.to_json()["views"] == ["as it is", "mirrored", "upside down", "both flips"]
    assert analyser.model.to_json()["members"] == 3
    older = FieldAnalyser(Store(tmp_path / "data1"), CellClassifier(bare / model.name))
    assert (older.model.views, older.model.members) == (("as it is",), 1)
    env = _env(make_env)
    env.analyser.classifier, env.analyser.model = analyser.classifier, analyser.model  # the model the service runs
    c, _ = env.admin_client()
    html = c.get("/admin/").get_data(as_text=True)
    assert html.split('id="model-views">')[1].split("</dd>")[0].startswith("4: each cell is scored as the mean of")
    assert html.split('id="model-members">')[1].split("</dd>")[0] == (
        "3: each score is the mean of 3 trained models (inside the model, one pass each)")
