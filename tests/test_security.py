"""Security on a clinic LAN: one audit test per point of the brief.

1. admin pages and every setting change need the password (hashed; no default that works)
2. first-run setup needs the one-time code printed to the service log
3. technician pages are open or behind a PIN, by config
4. CSRF token on every POST; session cookies HttpOnly and SameSite; sign-in attempts rate-limited
5. no path traversal through file routes; uploads limited in size and type; bombs refused undecoded
6. the service listens on the configured host:port and nothing else
"""

from __future__ import annotations

import io
import re
import stat
import struct
import threading
import time
import tomllib
import zlib
from pathlib import Path

import numpy as np
import pytest

from device.web import ADMIN_SESSION_MAX_S, MAX_UPLOAD_MB, PIN_EXEMPT
from tests.conftest import ADMIN_PASSWORD, ROOT, SAMPLES_DIR, admin_hash
from tests.test_service import Client, _free_port, _stop, _write_config, served

SAMPLE = sorted(SAMPLES_DIR.glob("*.jpg"))[0]
BAD = ROOT / "tests" / "fixtures" / "bad_inputs"
SETUP_CODE = re.compile(r"Setup code: ([A-Z0-9]{4}-[A-Z0-9]{4})")


def _client(env, addr: str | None = None):
    c = env.app.test_client()
    if addr:
        c.environ_base["REMOTE_ADDR"] = addr
    return c, env.csrf(c)


def _upload(c, token: str, data: bytes, name: str, slide_id: int = 1):
    """Upload ``data`` as the file ``name`` to the slide's fields, as the page's form does."""
    return c.post(f"/api/slides/{slide_id}/fields", headers={"X-CSRF-Token": token},
                  data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def _urls(app, method: str, include) -> list[tuple[str, str]]:
    """(endpoint, url) of every route taking ``method``, with 1 for each ID and a valid value for the rest."""
    out = []
    with app.test_request_context():
        from flask import url_for

        for rule in app.url_map.iter_rules():
            if method not in rule.methods or not include(rule.endpoint):
                continue
            args = {a: ("annotated" if a == "kind" else "style.css" if a == "filename" else 1) for a in rule.arguments}
            out.append((rule.endpoint, url_for(rule.endpoint, **args)))
    assert out
    return out


def _admin_env(make_env, **security):
    return make_env(security={"admin_password_hash": admin_hash(), **security})


# --- 1. the admin password ----------------------------------------------------------------------------

def test_admin_pages_and_every_setting_change_need_the_password(make_env):
    env = _admin_env(make_env)
    c, token = _client(env)
    open_endpoints = {"admin.login", "admin.setup", "admin.logout"}
    gets = _urls(env.app, "GET", lambda e: e.startswith("admin.") and e not in open_endpoints)
    posts = _urls(env.app, "POST", lambda e: e.startswith("admin.") and e not in open_endpoints)
    assert {e for e, _ in posts} >= {"admin.settings", "admin.password"}
    for _, url in gets:
        r = c.get(url)
        assert r.status_code == 302 and r.headers["Location"].startswith("/admin/login"), url
    form = {"counting_target_rbc": "1000", "threshold": "0.9", "camera_source": "replay", "technician_pin": "1111",
            "current": ADMIN_PASSWORD, "password": "x" * 12, "password2": "x" * 12, "csrf_token": token}
    for _, url in posts:
        r = c.post(url, data=form)
        assert r.status_code == 401 and "sign-in needed" in r.get_data(as_text=True), url
    # a PIN session is not an admin session; neither is a forged flag or a sign-in older than a working day
    with c.session_transaction() as s:
        s["pin_ok"] = "x"
        s["admin"] = True
    assert c.post("/admin/settings", data=form).status_code == 401
    admin, atoken = env.admin_client()
    with admin.session_transaction() as s:
        s["admin_at"] = time.time() - ADMIN_SESSION_MAX_S - 1
    assert admin.get("/admin/").status_code == 302
    assert not (env.store.data_dir / "settings.json").exists()
    assert env.deps.config.security.technician_pin == "" and env.deps.config.analysis.counting_target_rbc == 2000


def test_password_is_stored_hashed_and_no_default_password_works(make_env):
    shipped = tomllib.loads((ROOT / "systemd" / "config.toml").read_text())["security"]
    assert shipped["admin_password_hash"] == "" and shipped["technician_pin"] == ""  # nothing shipped to guess
    env = make_env()
    c, token = _client(env)
    for guess in ("", "admin", "password", "malaria", "malaria-detect", "raspberry", "12345678", "changeme"):
        r = c.post("/admin/login", data={"password": guess, "csrf_token": token})
        assert r.status_code == 302 and r.headers["Location"].endswith("/admin/setup"), guess
        assert c.get("/admin/").headers["Location"].endswith("/admin/setup")
    r = c.post("/admin/setup", data={"password": "guessed-first", "password2": "guessed-first", "csrf_token": token})
    assert r.status_code == 403  # no setup code: no password, however early
    form = {"setup_code": env.deps.setup_code, "password": "a-long-secret", "password2": "a-long-secret",
            "csrf_token": token}
    assert c.post("/admin/setup", data=form).status_code == 303
    for f in env.store.data_dir.rglob("*"):
        assert not f.is_file() or b"a-long-secret" not in f.read_bytes(), f
    assert re.search(r'"admin_password_hash": "(scrypt|pbkdf2):', (env.store.data_dir / "settings.json").read_text())


# --- 2. first-run setup ----------------------------------------------------------------------------

def test_first_run_setup_needs_the_one_time_code_printed_to_the_log(make_env, caplog):
    env = make_env(security={"login_attempts_per_minute": 3})
    logged = SETUP_CODE.findall(caplog.text)
    assert logged == [env.deps.setup_code]
    page = _client(env)[0].get("/admin/setup").get_data(as_text=True)
    assert "setup code" in page and "journalctl -u malaria-detect" in page
    lan, token = _client(env, "192.168.1.50")  # from another computer on the LAN: fine, with the code
    form = {"password": "clinic-admin-1", "password2": "clinic-admin-1", "csrf_token": token}
    for wrong in ("AAAA-AAAA", "", logged[0][:4]):
        r = lan.post("/admin/setup", data={**form, "setup_code": wrong})
        assert r.status_code == 403 and "Wrong setup code" in r.get_data(as_text=True)
    assert lan.post("/admin/setup", data={**form, "setup_code": logged[0]}).status_code == 429  # rate-limited
    other, otoken = _client(env, "192.168.1.51")
    typed = logged[0].lower().replace("-", " ")  # as a person types it
    r = other.post("/admin/setup", data={**form, "csrf_token": otoken, "setup_code": typed})
    assert r.status_code == 303 and other.get("/admin/").status_code == 200
    assert env.deps.setup_code is None  # spent
    late, ltoken = _client(env, "192.168.1.52")
    r = late.post("/admin/setup", data={**form, "csrf_token": ltoken, "setup_code": logged[0]})
    assert r.status_code == 302 and r.headers["Location"].endswith("/admin/login")
    caplog.clear()
    _admin_env(make_env)  # a device with a password prints no code
    assert not SETUP_CODE.search(caplog.text)


# --- 3. technician pages ------------------------------------------------------------------------------

def _technician(endpoint: str) -> bool:
    return endpoint not in PIN_EXEMPT and not endpoint.startswith("admin.")


def test_technician_pages_are_open_or_behind_the_pin_by_config(make_env):
    with_pin = make_env(security={"technician_pin": "5731"})
    c, token = _client(with_pin)
    gets = _urls(with_pin.app, "GET", _technician)
    posts = _urls(with_pin.app, "POST", _technician)
    assert len(gets) >= 10 and len(posts) >= 6
    for endpoint, url in gets + posts:
        method = c.get if (endpoint, url) in gets else c.post
        r = method(url, data={"csrf_token": token}) if method == c.post else method(url)
        if url.startswith("/api/"):
            assert r.status_code == 401 and "PIN" in r.get_json()["error"], url
        else:
            assert r.status_code == 302 and r.headers["Location"].startswith("/pin"), url
    for url in ("/api/status", "/healthz", "/metrics", "/static/app.js", "/pin", "/api/session"):
        assert c.get(url).status_code == 200, url  # monitoring, assets and the PIN page itself
    assert c.post("/pin", data={"pin": "5731", "csrf_token": token}).status_code == 303
    assert c.get("/history").status_code == 200
    open_lan = make_env()
    c, _ = _client(open_lan)
    for _, url in _urls(open_lan.app, "GET", _technician):
        r = c.get(url)
        assert not (r.status_code == 302 and "/pin" in r.headers.get("Location", "")) and r.status_code != 401, url


@pytest.mark.parametrize("nxt", ["/%09/evil.com", "/%0d/evil.com", "/%0a", "//evil.com", "/%5Cevil.com",
                                 "https://evil.com/", "/ /evil.com", "javascript:alert(1)"])
def test_a_next_address_never_leads_off_the_device(make_env, nxt):
    # "/\t/evil.com" went out as Location "//evil.com" (browsers drop the tab): another host; "/\n" was a 500
    env = _admin_env(make_env, technician_pin="5731")
    c, token = _client(env)
    r = c.post(f"/pin?next={nxt}", data={"pin": "5731", "csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"] == "/", r.headers.get("Location")
    r = c.get(f"/pin?next={nxt}")  # the PIN entered already: straight on, still to the start page
    assert r.status_code == 302 and r.headers["Location"] == "/"
    a, atoken = _client(env)
    r = a.post(f"/admin/login?next={nxt}", data={"password": ADMIN_PASSWORD, "csrf_token": atoken})
    assert r.status_code == 303 and r.headers["Location"] == "/admin/", r.headers.get("Location")
    ok = a.post("/admin/logout", data={"csrf_token": env.csrf(a)})
    assert ok.status_code == 303
    a2, t2 = _client(env)
    r = a2.post("/admin/login?next=/admin/%23backup", data={"password": ADMIN_PASSWORD, "csrf_token": t2})
    assert r.headers["Location"] == "/admin/#backup"  # a local admin address is kept


def test_an_admin_signing_in_or_out_in_another_tab_leaves_the_technicians_slide_working(make_env):
    # one browser: the technician's slide tab kept its CSRF token in the page, and both the admin's
    # sign-in and sign-out cleared the session: "CSRF token missing or wrong", then back to the PIN
    env = _admin_env(make_env, technician_pin="5731")
    c, token = _client(env)
    assert c.post("/pin", data={"pin": "5731", "csrf_token": token}).status_code == 303
    token = env.csrf(c)  # what the slide page holds
    h = {"X-CSRF-Token": token}
    assert c.post("/api/slides", json={"sample_id": "TAB-1"}, headers=h).status_code == 201
    assert c.post("/admin/login", data={"password": ADMIN_PASSWORD, "csrf_token": token}).status_code == 303
    assert c.get("/admin/").status_code == 200
    assert c.post("/api/slides", json={"sample_id": "TAB-2"}, headers=h).status_code == 201
    assert c.post("/admin/logout", data={"csrf_token": token}).status_code == 303
    assert c.get("/admin/").status_code == 302  # signed out of the admin pages...
    assert c.get("/slides/1").status_code == 200  # ...not out of the PIN
    assert c.post("/api/slides", json={"sample_id": "TAB-3"}, headers=h).status_code == 201


def test_signing_out_ends_the_admin_sign_in_for_every_copy_of_the_cookie(make_env):
    # the session is a signed cookie: "Sign out" dropped the mark in the browser that pressed it, and a copy
    # taken before (another browser, a shared profile) stayed an admin for the rest of its 12 hours
    from device.web import create_app

    env = _admin_env(make_env)
    admin, token = env.admin_client()
    cookie = admin.get_cookie("malaria_detect").value
    thief = env.app.test_client()
    thief.set_cookie("malaria_detect", cookie)
    assert thief.get("/admin/").status_code == 200  # the copy works while the admin is signed in
    assert admin.post("/admin/logout", data={"csrf_token": token}).status_code == 303
    r = thief.get("/admin/")
    assert r.status_code == 302 and r.headers["Location"].startswith("/admin/login")
    form = {"counting_target_rbc": "1000", "csrf_token": token}
    assert thief.post("/admin/settings", data=form).status_code == 401
    assert env.deps.config.analysis.counting_target_rbc == 2000
    # signing in again gives a new sign-in; the old cookie stays dead
    admin2, _ = env.admin_client()
    assert admin2.get("/admin/").status_code == 200 and thief.get("/admin/").status_code == 302
    # a restart (same session key) ends every admin sign-in: the cookie alone is not enough
    restarted = create_app(env.config, env.store, env.feed, env.analyser, secret_key=env.app.secret_key)
    again = restarted.test_client()
    again.set_cookie("malaria_detect", admin2.get_cookie("malaria_detect").value)
    assert again.get("/admin/").status_code == 302


def test_a_password_change_ends_the_other_admin_sign_ins_on_the_device(make_env):
    env = _admin_env(make_env)
    one, t1 = env.admin_client()
    two, _ = env.admin_client()
    r = one.post("/admin/password", data={"current": ADMIN_PASSWORD, "password": "n" * 12, "password2": "n" * 12,
                                          "csrf_token": t1})
    assert r.status_code == 303
    assert one.get("/admin/").status_code == 200 and two.get("/admin/").status_code == 302
    assert len(env.deps.admin_sessions._alive) == 1  # the other sign-in is gone from the device, not only stale


def test_admin_sign_ins_are_bounded_and_expire():
    from device.web.security import AdminSessions

    now = [0.0]
    reg = AdminSessions(max_age_s=100, max_alive=3, clock=lambda: now[0])
    a = reg.start()
    now[0] = 50
    b, c = reg.start(), reg.start()
    assert all(reg.alive(x) for x in (a, b, c)) and not reg.alive("forged") and not reg.alive(None)
    now[0] = 60
    d = reg.start()  # a fourth: the oldest ends
    assert not reg.alive(a) and all(reg.alive(x) for x in (b, c, d))
    now[0] = 151  # b and c signed in at 50: 101 s ago
    assert not reg.alive(b) and not reg.alive(c) and reg.alive(d)


# --- 4. CSRF, cookies, rate limits ----------------------------------------------------------------

def test_every_post_needs_the_sessions_csrf_token(make_env):
    env = _admin_env(make_env, technician_pin="5731")
    anonymous, _ = _client(env)
    admin, _ = env.admin_client()
    posts = _urls(env.app, "POST", lambda e: True)
    assert len(posts) >= 12
    for c in (anonymous, admin):
        for _, url in posts:
            for headers, form in (({}, {}), ({"X-CSRF-Token": "forged"}, {}), ({}, {"csrf_token": "forged"})):
                r = c.post(url, headers=headers, data=form)
                assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True), (url, headers, form)


def test_session_cookies_are_httponly_and_samesite(make_env):
    env = _admin_env(make_env, technician_pin="5731")
    c = env.app.test_client()
    cookies = [c.get("/").headers["Set-Cookie"]]
    token = env.csrf(c)
    cookies.append(c.post("/pin", data={"pin": "5731", "csrf_token": token}).headers["Set-Cookie"])
    r = c.post("/admin/login", data={"password": ADMIN_PASSWORD, "csrf_token": env.csrf(c)})
    cookies.append(r.headers["Set-Cookie"])
    for cookie in cookies:
        assert cookie.startswith("malaria_detect=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Path=/" in cookie
    for h, v in (("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff")):
        assert r.headers[h] == v


def test_sign_in_attempts_are_rate_limited_per_client(make_env):
    env = _admin_env(make_env, technician_pin="5731", login_attempts_per_minute=2)
    attempts = {
        "admin login": ("/admin/login", {"password": "wrong"}, {"password": ADMIN_PASSWORD}),
        "technician PIN": ("/pin", {"pin": "0000"}, {"pin": "5731"}),
    }
    for what, (url, wrong, right) in attempts.items():
        c, token = _client(env, f"10.0.0.{len(what)}")
        for _ in range(2):
            assert c.post(url, data={**wrong, "csrf_token": token}).status_code == 401, what
        r = c.post(url, data={**right, "csrf_token": token})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0, what  # even the right one, for now
    admin, atoken = env.admin_client()
    form = {"password": "new-secret-99", "password2": "new-secret-99", "csrf_token": atoken}
    for _ in range(2):
        assert admin.post("/admin/password", data={**form, "current": "wrong"}).status_code == 401
    assert admin.post("/admin/password", data={**form, "current": ADMIN_PASSWORD}).status_code == 429
    elsewhere, etoken = _client(env, "10.9.9.9")  # other computers are not locked out
    assert elsewhere.post("/admin/login", data={"password": ADMIN_PASSWORD, "csrf_token": etoken}).status_code == 303


def test_guesses_from_many_addresses_meet_a_limit_for_all_and_parallel_ones_cannot_pass_together(make_env,
                                                                                                 monkeypatch):
    """The limit counted per address only: 23 addresses of one laptop found a 4-digit PIN in 0.6 s. And it
    was checked before the slow password hash, so 40 wrong passwords sent at once had 11 checked against a
    limit of 5."""
    from concurrent.futures import ThreadPoolExecutor

    import device.web.security as security_mod
    from device.web import LOGIN_ATTEMPTS_ALL_CLIENTS_PER_MINUTE

    env = _admin_env(make_env, technician_pin="5731", login_attempts_per_minute=3)
    clients = [_client(env, f"10.1.{i // 250}.{i % 250}") for i in range(LOGIN_ATTEMPTS_ALL_CLIENTS_PER_MINUTE + 5)]
    # the clinic's own sign-ins do not use the budget up: 40 right PINs from 40 tablets
    for i in range(40):
        c, t = _client(env, f"10.4.0.{i}")
        assert c.post("/pin", data={"pin": "5731", "csrf_token": t}).status_code == 303
    answers = [c.post("/pin", data={"pin": f"{i:04d}", "csrf_token": t}) for i, (c, t) in enumerate(clients)]
    codes = [r.status_code for r in answers]
    assert codes.count(401) == LOGIN_ATTEMPTS_ALL_CLIENTS_PER_MINUTE and codes.count(429) == 5
    assert "from all computers together" in answers[-1].get_data(as_text=True)  # not "your" wrong PINs
    env2 = _admin_env(make_env, login_attempts_per_minute=5)
    c, token = _client(env2, "10.2.0.1")
    checked = []
    real = security_mod.check_password
    monkeypatch.setattr(security_mod, "check_password", lambda h, p: (checked.append(p), time.sleep(0.05),
                                                                      real(h, p))[2])
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: c.post("/admin/login", data={"password": "wrong-guess", "csrf_token": token})
                              .status_code, range(40)))
    assert len(checked) == 5 and codes.count(401) == 5 and codes.count(429) == 35


def test_non_ascii_pins_tokens_and_codes_are_wrong_answers_not_server_errors(make_env):
    """compare_digest raises TypeError on non-ASCII text: a 500 (and a traceback in the log) before any limit."""
    env = _admin_env(make_env, technician_pin="5731")
    c, token = _client(env, "10.3.0.1")
    assert c.post("/pin", data={"pin": "\u0661\u0662\u0663\u0664", "csrf_token": token}).status_code == 401
    assert c.post("/pin", data={"pin": "1234", "csrf_token": "\u00e9" * 10}).status_code == 400
    r = c.post("/api/slides", json={"sample_id": "S"}, headers={"X-CSRF-Token": "\u00e9".encode().decode("latin-1")})
    assert r.status_code == 400


# --- 5. files and uploads -------------------------------------------------------------------------

TRAVERSALS = [
    "/fields/1/../../secret_key", "/fields/..%2F..%2Fsecret_key/annotated.jpg", "/fields/1/..%2F..%2Fsecret_key.jpg",
    "/static/../secret_key", "/static/%2e%2e/%2e%2e/data0/secret_key", "/static/..%2f..%2f..%2fdevice/config.py",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd", "/cells/-1/crop.jpg",
    "/cells/1/crop.jpg/../../../etc/passwd",
    "/fields/1/raw.jpg/..%2f..%2f..%2fsettings.json", "/preview.jpg/../secret_key", "//etc/passwd",
    "/fields/0x1/annotated.jpg", "/fields/1e3/annotated.jpg",
]


def test_file_routes_take_ids_not_paths(make_env):
    env = make_env()
    c, token = _client(env)
    c.post("/api/slides", json={"sample_id": "T"}, headers={"X-CSRF-Token": token})
    evil = "../../../../tmp/evil-upload.jpg"
    r = _upload(c, token, SAMPLE.read_bytes(), evil)
    assert r.status_code == 201
    assert not Path("/tmp/evil-upload.jpg").exists() and not list(env.store.data_dir.rglob("*evil*"))
    secret = (env.store.data_dir / "secret_key").read_bytes()
    for url in TRAVERSALS:
        r = c.get(url)
        assert r.status_code == 404, (url, r.status_code)
        assert secret not in r.data and b"root:" not in r.data and b"THRESHOLD_SAFE_RANGE" not in r.data, url
    names = {p.name for p in env.store.images_dir.rglob("*.jpg")}
    assert names and all(re.fullmatch(r"[0-9a-f]{16}_(annotated|raw|cell\d+)\.jpg", n) for n in names)
    r = _upload(c, token, b"x", "../../etc/notes.txt")
    assert r.status_code == 400 and "../" not in r.get_json()["error"]  # the name is shown, never used as a path


def _jpeg_header(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\x00" * 2000 + b"\xff\xd9"


def _tiff_header(w: int, h: int, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 8), (277, 3, 1, 3)]
    ifd = struct.pack(e + "H", len(entries)) + b"".join(
        struct.pack(e + "HHII", t, typ, n, v) if typ == 4 else struct.pack(e + "HHIHH", t, typ, n, v, 0)
        for t, typ, n, v in entries) + b"\x00" * 4
    return (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8) + ifd + zlib.compress(b"\0" * 10000)


def _webp_header(w: int, h: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _bmp_header(w: int, h: int) -> bytes:
    """A BMP file header and info header; a negative height is a top-down picture of that many rows."""
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0) + b"\0" * 100)


@pytest.mark.parametrize("name, data", [
    ("huge.png", (BAD / "huge_30000x30000.png").read_bytes()),
    ("huge.bmp", _bmp_header(20000, 20000)),
    ("huge-top-down.bmp", _bmp_header(20000, -20000)),  # a negative height is rows top-down: still 400 MP
    ("huge.jpg", _jpeg_header(20000, 20000)),
    ("huge.tif", _tiff_header(30000, 30000)),
    ("huge-mm.tiff", _tiff_header(40000, 20000, big_endian=True)),
    ("huge.webp", _webp_header(16383, 16383)),
])
def test_decompression_bombs_are_refused_before_decoding(make_env, monkeypatch, name, data):
    import cv2

    def no_decoding(*_a, **_k):
        raise AssertionError("the decoder was called")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    env = make_env()
    c, token = _client(env)
    c.post("/api/slides", json={"sample_id": "B"}, headers={"X-CSRF-Token": token})
    r = _upload(c, token, data, name)
    error = r.get_json()["error"]
    assert r.status_code == 400 and "over the 25 MP limit of the device's uploads" in error, error


def test_uploads_stop_at_25_mp_before_decoding_while_the_command_line_reads_up_to_50(make_env):
    """The service stays under its unit's memory limits: a 24 MP upload decoded whole peaked at 350-356 MB
    (tests/benchmarks/bench_upload_memory.py); a 50 MP one took it past MemoryMax before. So a picture decoded
    whole stops at 25 MP, refused before decoding with what to do instead, while ``python -m device analyze``
    reads 50. (A colour JPEG of large cells is decoded reduced: the next test.)"""
    from device.imageio import MAX_SERVICE_FIELD_PIXELS, ImageError, decode_rgb

    assert MAX_SERVICE_FIELD_PIXELS == 25_000_000
    env = make_env()
    c, token = _client(env)
    c.post("/api/slides", json={"sample_id": "B"}, headers={"X-CSRF-Token": token})

    def post(data):
        return _upload(c, token, data, "big.jpg")

    r = post(_jpeg_header(5001, 5000))  # 25.005 MP; its size is checked first of all, from the header
    assert r.status_code == 400
    error = r.get_json()["error"]
    assert "5001x5000 is 25.005 MP, over the 25 MP limit of the device's uploads" in error
    assert "python -m device analyze" in error
    r = post(_jpeg_header(5000, 5000))  # 25 MP: not refused for its size (but this header holds no picture)
    assert r.status_code == 400 and "limit" not in r.get_json()["error"]
    with pytest.raises(ImageError) as cli:  # what the command line decodes: not refused for its size
        decode_rgb(_jpeg_header(7000, 7000))
    assert "limit" not in str(cli.value)
    with pytest.raises(ImageError, match="over the 50 MP limit"):  # and no caller can raise the 50 MP cap
        decode_rgb(_jpeg_header(7072, 7072), max_pixels=10**9)


def test_a_large_jpeg_upload_of_large_cells_is_decoded_reduced_up_to_50_mp(make_env):
    """Uploads over 25 MP were refused, so a 48 MP camera's or phone's JPEG could only be analysed on a
    computer, and a 24 MP one decoded whole took the service to 352 MB. A colour JPEG over 16 MP whose cells
    stay at least 96 px across at 1/2 is now decoded at 1/2, never held whole (48 MP: the service peaked at
    251 MB), and stored as analysed; one whose cells would be too small, and any other picture, is decoded
    whole and still refused over 25 MP, before decoding, as is a progressive one."""
    import cv2

    from device.analysis import analyze_field

    env = make_env()
    c, token = _client(env)
    assert c.post("/api/slides", json={"sample_id": "BIG"}, headers={"X-CSRF-Token": token}).status_code == 201

    def post(data, name="big.jpg"):
        return _upload(c, token, data, name)

    field = cv2.imread(str(SAMPLE))  # 1600 x 1200, cells ~100 px
    big = cv2.resize(field, (6600, 4950), interpolation=cv2.INTER_LINEAR)  # 32.7 MP, cells ~410 px
    r = post(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    assert r.status_code == 201, r.get_json()
    stored = r.get_json()["field"]
    assert (stored["width"], stored["height"]) == (3300, 2475)  # stored as analysed: at 1/2
    assert stored["rejected"] is None and stored["source"] == "upload"
    original = analyze_field(cv2.cvtColor(field, cv2.COLOR_BGR2RGB), env.analyser.classifier)
    assert abs(stored["rbc_count"] - original.rbc_count) <= 0.03 * original.rbc_count  # the same cells found
    small_cells = np.tile(field, (4, 4, 1))  # 30.7 MP of cells ~100 px: at 1/2 under 96 px, so read whole
    r = post(cv2.imencode(".jpg", small_cells, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), "tiled.jpg")
    assert r.status_code == 400 and "6400x4800 is 30.72 MP, over the 25 MP limit" in r.get_json()["error"]
    gray = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_BGR2GRAY), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    r = post(gray.tobytes(), "gray.jpg")  # reduced, a gray JPEG would come out as colour: never reduced
    assert r.status_code == 400 and "over the 25 MP limit" in r.get_json()["error"]
    # progressive: it holds the whole picture's coefficients at any scale (483 MB at 48 MP): refused undecoded
    progressive = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    r = post(progressive.tobytes(), "progressive.jpg")
    assert r.status_code == 400 and "6600x4950 is 32.67 MP, over the 25 MP limit" in r.get_json()["error"]
    r = post(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 60])[1].tobytes(), "poor.jpg")
    assert r.status_code == 400 and "quality ~60" in r.get_json()["error"]  # its own reason, not its size
    assert len(env.store.list_fields(1)) == 1


def test_an_upload_is_refused_before_decoding_while_the_analyser_is_full(make_env, monkeypatch):
    """Uploads were decoded in their request threads and refused only then, busy: four 24 MP uploads at once
    took the service to 635 MB, past its unit's MemoryMax. Now a full analyser refuses one undecoded (503),
    and uploads are decoded one at a time."""
    from device.web import views as web_views

    env = make_env()
    c, token = _client(env)
    c.post("/api/slides", json={"sample_id": "B"}, headers={"X-CSRF-Token": token})
    decoded = []
    real = web_views.decode_field
    monkeypatch.setattr(web_views, "decode_field", lambda *a, **k: decoded.append(1) or real(*a, **k))

    field = sorted(SAMPLES_DIR.glob("*.jpg"))[0].read_bytes()

    def post():
        return _upload(c, token, field, "f.jpg")

    monkeypatch.setattr(env.analyser, "full", lambda: True)
    r = post()
    assert r.status_code == 503 and "still analysing the previous fields" in r.get_json()["error"]
    assert not decoded
    monkeypatch.setattr(env.analyser, "full", lambda: False)
    r = post()
    assert r.status_code == 201 and decoded == [1], r.get_json()
    # one decoding at a time: the lock is held while an upload is decoded
    assert isinstance(web_views._UPLOAD_DECODING, type(threading.Lock()))
    web_views._UPLOAD_DECODING.acquire()
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (post(), done.set()), daemon=True)
        t.start()
        assert not done.wait(1.0) and decoded == [1]  # waits for the decoding before it
    finally:
        web_views._UPLOAD_DECODING.release()
    assert done.wait(60) and decoded == [1, 1]


def test_the_pixel_limit_is_50_mp_exactly():
    from device.imageio import ImageError, decode_rgb, header_size

    assert header_size(_bmp_header(20000, -20000)) == (20000, 20000)
    for header in (_webp_header, _jpeg_header):
        assert header_size(header(7072, 7072)) == (7072, 7072)
        with pytest.raises(ImageError, match="7072x7072 is 50.013 MP, over the 50 MP limit"):  # 50.01 MP
            decode_rgb(header(7072, 7072))
        with pytest.raises(ImageError) as below:  # 49.998 MP: refused for what it is, not for its size
            decode_rgb(header(7071, 7071))
        assert "limit" not in str(below.value)


def test_uploads_are_limited_in_size_and_type(make_env):
    env = make_env()
    assert env.app.config["MAX_CONTENT_LENGTH"] == MAX_UPLOAD_MB * 1024 * 1024
    c, token = _client(env)
    c.post("/api/slides", json={"sample_id": "U"}, headers={"X-CSRF-Token": token})

    def upload(data, name):
        return _upload(c, token, data, name)

    r = upload(b"\xff\xd8" + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1), "big.jpg")
    assert r.status_code == 413 and "too large" in r.get_json()["error"]
    for name in ("page.html", "drawing.svg", "script.js", "archive.zip", "noextension"):
        r = upload(SAMPLE.read_bytes(), name)
        assert r.status_code == 400 and "not an image file" in r.get_json()["error"], name
    r = upload(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "disguised.png")
    assert r.status_code == 400 and "not a supported image" in r.get_json()["error"]
    assert env.store.totals(1)["fields"] == 0


# --- 6. what listens ------------------------------------------------------------------------------

def _sockets_of(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _inet_sockets(pid: int) -> list[tuple[str, str, int, str]]:
    """(table, local address, port, state) of the process's TCP/UDP sockets, from /proc/net."""
    def addr(hex_addr: str) -> str:
        if len(hex_addr) == 8:
            return ".".join(str(b) for b in bytes.fromhex(hex_addr)[::-1])
        words = [bytes.fromhex(hex_addr[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
        return ":".join("".join(words)[i:i + 4] for i in range(0, 32, 4))

    mine = _sockets_of(pid)
    out = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in mine:
                host, port = f[1].split(":")
                out.append((table, addr(host), int(port, 16), {"0A": "LISTEN", "01": "ESTABLISHED"}.get(f[3], f[3])))
    return out


def test_the_service_listens_on_the_configured_address_only(tmp_path):
    """Also, on the real process: settings.json applied at start-up, the setup code in the log."""
    port = _free_port()
    (tmp_path / "data").mkdir()  # an admin set a PIN on the page earlier: start-up applies it over the config
    (tmp_path / "data" / "settings.json").write_text('{"security": {"technician_pin": "8642"}}')
    with served(tmp_path, _write_config(tmp_path, port)) as (proc, notify):
        c = Client(f"http://127.0.0.1:{port}")
        assert c.request("/healthz")[0] == 200
        assert c.json("/api/slides")[0] == 401 and c.json("/api/status")[0] == 200
        time.sleep(0.3)  # let the camera and the analysis threads settle: anything they open shows now
        socks = _inet_sockets(proc.pid)
        listening = [s for s in socks if s[3] == "LISTEN" or s[0].startswith("udp")]
        assert listening == [("tcp", "127.0.0.1", port, "LISTEN")], socks
        # the first-run code is in the log (the journal under systemd) and sets the password over HTTP
        code = SETUP_CODE.search((tmp_path / "service.log").read_text()).group(1)
        c.token = c.json("/api/session")[1]["csrf_token"]
        body = f"setup_code={code}&password=served-secret&password2=served-secret&csrf_token={c.token}".encode()
        status, _, _ = c.request("/admin/setup", body, "POST", {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200  # 303 followed to the admin page
        status, html, _ = c.request("/admin/")
        assert status == 200 and b"Last problems" in html
        assert _stop(proc) == 0


def test_a_password_of_only_spaces_is_refused():
    from device.web.security import hash_password

    with pytest.raises(ValueError, match="only spaces"):
        hash_password(" " * 12)
    assert hash_password("correct horse battery")  # spaces inside are fine


def test_failed_attempts_count_for_one_minute_only():
    """Five wrong PINs hold a technician back for the rest of that minute, not longer."""
    from device.web.security import RateLimiter

    clock = [0.0]
    limiter = RateLimiter(5, clock=lambda: clock[0])
    for _ in range(5):
        assert limiter.acquire("10.0.0.7") == (0, False)
        clock[0] += 1.0
    wait, everyone = limiter.acquire("10.0.0.7")
    assert 0 < wait <= 60 and not everyone
    assert limiter.acquire("10.0.0.8") == (0, False)  # another client is not held back by this one
    clock[0] = 61.0  # a minute after the first attempt: it no longer counts
    assert limiter.acquire("10.0.0.7") == (0, False)


def test_a_session_key_readable_by_others_is_made_private_again(tmp_path):
    import os

    from device.web.security import load_or_create_secret_key

    key = load_or_create_secret_key(tmp_path)
    path = tmp_path / "secret_key"
    os.chmod(path, 0o644)  # restored from a copy, or changed by hand
    assert load_or_create_secret_key(tmp_path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
