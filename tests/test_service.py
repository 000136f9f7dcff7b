"""The service as systemd and `make demo` run it: a real waitress server on a free loopback port."""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from device import service
from tests.conftest import MODEL_PATH, ROOT, SAMPLES_DIR, live_server, make_config, wait_new_view, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(tmp_path: Path, port: int, model: Path = MODEL_PATH) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[service]
host = "127.0.0.1"
port = {port}
data_dir = "{tmp_path / 'data'}"
min_free_disk_mb = 0
[camera]
source = "replay"
replay_path = "{SAMPLES_DIR}"
replay_fps = 5.0
[model]
path = "{model}"
""")
    return cfg


class Client:
    """urllib with a cookie jar: a browser session without a browser."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.token = None

    def request(self, path, data=None, method=None, headers=None, timeout=30):
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers

    def json(self, path, body=None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            if self.token is None:
                self.token = self.json("/api/session")[1]["csrf_token"]
            headers.update({"Content-Type": "application/json", "X-CSRF-Token": self.token})
            data = json.dumps(body).encode()
        status, raw, _ = self.request(path, data, "POST" if body is not None else "GET", headers)
        return status, json.loads(raw)


class Notifications:
    """A NOTIFY_SOCKET for the service under test: what systemd would receive.

    Read all the time, as systemd does: a queue left unread (11 datagrams on Linux, 2.2 s of watchdog
    pings) blocked the service's STOPPING=1, and SIGTERM then hung on a slow machine.
    """

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[str] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            with self._changed:
                self.received.append(msg)
                self._changed.notify_all()

    def wait_for(self, message: str, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(message in m for m in self.received), timeout_s)

    def close(self):
        self._closed = True
        self._reader.join(2)
        self.sock.close()


def _serve(tmp_path, config: Path, notify: Notifications, watchdog_usec=400_000):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    with open(tmp_path / "service.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "device", "serve", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def served(tmp_path, config: Path, notify_name: str = "notify"):
    """`python -m device serve` under a stand-in systemd: yields ``(proc, notify)`` once it sent READY=1.

    On the way out a service still running is killed and reaped, and the notify socket closed.
    """
    notify = Notifications(tmp_path / notify_name)
    proc = _serve(tmp_path, config, notify)
    try:
        assert notify.wait_for("READY=1", 60), (tmp_path / "service.log").read_text()
        yield proc, notify
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        notify.close()


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(20)


def test_serve_runs_under_systemd_notify_and_stops_cleanly(tmp_path):
    port = _free_port()
    with served(tmp_path, _write_config(tmp_path, port)) as (proc, notify):
        assert notify.wait_for("WATCHDOG=1", 5)
        c = Client(f"http://127.0.0.1:{port}")
        status, st = c.json("/api/status")
        assert status == 200 and st["model"]["ok"] and st["model"]["sha256"]
        assert wait_until(lambda: c.json("/api/status")[1]["camera"]["state"] == "connected", 20)
        status, slide = c.json("/api/slides", {"sample_id": "SRV-1"})
        assert status == 201
        status, body = c.json(f"/api/slides/{slide['id']}/fields", {})
        assert status == 201 and body["field"]["rbc_count"] > 10
        status, html, headers = c.request("/")
        assert status == 200 and b"SRV-1" in html and headers["Server"] == "malaria-detect"
        assert c.request("/api/slides/999")[0] == 404
        assert _stop(proc) == 0
        assert notify.wait_for("STOPPING=1", 5)
    log = (tmp_path / "service.log").read_text()
    assert f"serving on http://127.0.0.1:{port}/" in log and "Traceback" not in log


def test_serve_with_a_missing_model_keeps_the_page_up_and_says_why(tmp_path):
    port = _free_port()
    with served(tmp_path, _write_config(tmp_path, port, model=tmp_path / "gone.tflite")) as (proc, notify):
        c = Client(f"http://127.0.0.1:{port}")
        status, st = c.json("/api/status")
        assert status == 200 and st["model"]["ok"] is False and "model file missing" in st["model"]["error"]
        status, html, _ = c.request("/")
        assert status == 200 and b"The model is unusable" in html
        status, body = c.json("/api/slides", {"sample_id": "X"})
        assert status == 503 and "unusable" in body["error"]
        assert notify.wait_for("STATUS=camera", 5) and any("model UNUSABLE" in m for m in notify.received)
        assert _stop(proc) == 0
    log = (tmp_path / "service.log").read_text()
    assert "MODEL UNUSABLE" in log and "Traceback" not in log


def test_serve_bad_config_exits_78_without_a_traceback(tmp_path, caplog):
    bad = tmp_path / "bad.toml"
    bad.write_text("[camera]\nsource = 'webcam'\n")
    assert service.serve(str(bad)) == service.EX_CONFIG
    assert "camera.source" in caplog.text


def test_serve_port_in_use_exits_1(tmp_path, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert service.serve(str(_write_config(tmp_path, port))) == 1
    assert "cannot serve on 127.0.0.1" in caplog.text


class _HeldClassifier:
    """The real classifier, held inside ``predict`` until released: analysis must not hold up /api/status."""

    def __init__(self, clf):
        self._clf = clf
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._clf, name)

    def predict(self, batch):
        self.entered.set()
        assert self.release.wait(60), "the test never released the classifier"
        return self._clf.predict(batch)


def test_status_answers_while_a_field_is_analysed(tmp_path, classifier):
    from device.camera import CameraFeed, ReplayCamera
    from device.service import FieldAnalyser
    from device.store import Store
    from device.web import create_app

    cfg = make_config(tmp_path / "data")
    store = Store(cfg.service.data_dir)
    feed = CameraFeed(lambda: ReplayCamera(SAMPLES_DIR, 5), source="replay").start()
    held = _HeldClassifier(classifier)
    analyser = FieldAnalyser(store, held)
    app = create_app(cfg, store, feed, analyser)
    try:
        with live_server(app, threads=4) as server:
            try:
                c = Client(f"http://127.0.0.1:{server.effective_port}")
                sid = c.json("/api/slides", {"sample_id": "BUSY"})[1]["id"]
                assert feed.wait_frame(0, 10) is not None
                result = {}
                t = threading.Thread(target=lambda: result.update(r=c.json(f"/api/slides/{sid}/fields", {})))
                t.start()
                assert held.entered.wait(60)
                # the analysis is held inside the classifier: the status page still answers, and says busy
                for _ in range(3):
                    status, st = c.json("/api/status")
                    assert status == 200 and st["analysis"]["busy"] is True
                assert t.is_alive() and "r" not in result  # answered while the capture was still running
                held.release.set()
                t.join(60)
                assert result["r"][0] == 201
                # a third capture while one runs and one waits is refused, not queued without end
                analyser.max_pending = 0
                for _ in range(5):  # the replay can come round to the counted view between the check and the request
                    wait_new_view(SimpleNamespace(app=app, feed=feed), sid)  # not the view just counted
                    status, body = c.json(f"/api/slides/{sid}/fields", {})
                    if not (status == 409 and "already counted" in body.get("error", "")):
                        break
                assert status == 503 and "still analysing" in body["error"]
            finally:
                held.release.set()  # never leave the analysis thread (nor the server's worker) waiting
    finally:
        feed.stop()
        analyser.shutdown()
        store.close()


def test_the_test_server_stops_after_the_request_it_is_serving(caplog):
    """The shared test server (conftest.live_server) lets a request being served finish, then closes
    everything in its own thread: its loop ends, and no worker pulls a closed trigger (waitress logs that
    "Exception when servicing" ... EBADF)."""
    import http.client

    gate, entered = threading.Event(), threading.Event()

    def app(environ, start_response):
        entered.set()
        gate.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    answer = {}

    def get(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")  # HTTP/1.1: the connection stays open after the answer
        answer["body"] = conn.getresponse().read()

    caplog.set_level(logging.WARNING, logger="waitress")
    with live_server(app, threads=2) as server:
        client = threading.Thread(target=get, args=(server.effective_port,))
        client.start()
        assert entered.wait(10)
        threading.Timer(0.3, gate.set).start()  # the request is still being served when the stop begins
    client.join(10)
    assert answer == {"body": b"ok"}
    assert [r.getMessage() for r in caplog.records if r.name.startswith("waitress")] == []
    assert not any(t.name == "waitress-loop" and t.is_alive() for t in threading.enumerate())


class _Notifier:
    def __init__(self):
        self.sent = []

    def notify(self, msg):
        self.sent.append(msg)


def test_watchdog_pings_only_while_the_capture_loop_turns():
    script = [True, True, True, False, False, False]  # the capture loop turns, then stalls
    asked, done = [], threading.Event()

    def healthy():
        asked.append(1)
        if len(asked) >= len(script):
            done.set()
        return script[min(len(asked), len(script)) - 1]

    n = _Notifier()
    wd = service.Watchdog(n, healthy, 0.001, status=lambda: "camera connected").start()
    assert done.wait(10)
    wd.stop()
    # one ping per healthy turn, none once the loop stalls; the status line is sent once, not every turn
    assert n.sent.count("WATCHDOG=1") == 3
    assert n.sent.count("STATUS=camera connected") == 1


@pytest.mark.parametrize("usec, pid, expected", [
    ("60000000", None, 30.0), ("60000000", "1", service.DEFAULT_WATCHDOG_INTERVAL_S),
    (None, None, service.DEFAULT_WATCHDOG_INTERVAL_S)])
def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch, usec, pid, expected):
    for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    assert service.watchdog_interval_s() == expected


def _slide(fp: float) -> dict:
    return {"threshold": 0.9, "fp_rate_per_cell": fp, "target_rbc": 2000, "rbc_per_ul": 5e6,
            "rbc_per_ul_measured": 0}


def test_reviewed_call_drops_the_allowance_when_every_flag_is_reviewed_and_a_confirmed_cell_always_counts():
    totals = {"rbc_count": 2100, "infected_count": 6, "reviewed_infected_count": 2, "fields_used": 10,
              "fields_rejected": 0, "review": {"confirmed": 2, "rejected": 4, "pending": 0}}
    auto = service.slide_summary(_slide(0.003), totals)
    assert auto.call == "negative"  # 6 flags are within the ~6 false positives expected
    reviewed = service.slide_summary(_slide(0.003), totals, reviewed=True)
    assert reviewed.call == "positive" and reviewed.infected_count == 2  # two parasites confirmed by a person
    # partly reviewed: the two parasites a person confirmed still make the call (this read "negative")
    partly = dict(totals, review={"confirmed": 2, "rejected": 3, "pending": 1}, reviewed_infected_count=3)
    assert service.slide_summary(_slide(0.003), partly, reviewed=True).call == "positive"
    # nothing confirmed yet: the unreviewed flags keep the false-positive allowance
    unconfirmed = dict(totals, review={"confirmed": 0, "rejected": 3, "pending": 3}, reviewed_infected_count=3)
    assert service.slide_summary(_slide(0.003), unconfirmed, reviewed=True).call == "negative"


def test_call_false_positive_rate_follows_the_operating_threshold():
    from device.model_card import ModelCard

    card = ModelCard(Path("x.json"), {"threshold": 0.9, "call_false_positive_rate": 0.004, "operating_curve": [
        {"threshold": 0.5, "call_false_positive_rate": 0.02, "sensitivity": 0.97},
        {"threshold": 0.9, "call_false_positive_rate": 0.004, "sensitivity": 0.9}]})
    assert service._call_fp_rate(card, 0.9) == 0.004
    assert service._call_fp_rate(card, 0.6) == 0.02  # a lower admin threshold gets the higher FP rate
    assert service._call_fp_rate(None, 0.9) is None


def test_a_threshold_the_card_gives_no_false_positive_rate_for_makes_the_model_unusable(tmp_path):
    """A card without an operating curve and another threshold in the config used the card's own rate
    (measured at 0.979) for a threshold of 0.9: a positive call from far fewer flagged cells."""
    from device.analysis import AnalysisSettings
    from device.model_card import ModelCard
    from device.service import FieldAnalyser
    from device.store import Store

    no_curve = ModelCard(Path("x.json"), {"name": "m", "threshold": 0.979, "call_false_positive_rate": 0.004})
    clf = SimpleNamespace(card=no_curve, threshold=0.979, sha256="ab" * 32, runtime="test", input_size_px=48)
    store = Store(tmp_path / "data")
    try:
        ok = FieldAnalyser(store, clf)
        assert ok.model.ok and ok.model.fp_rate_per_cell == 0.004
        with pytest.raises(ValueError, match="no false-positive rate at threshold 0.9"):
            ok.set_threshold(0.9)
        assert ok.model.threshold == 0.979 and ok.settings.threshold is None  # nothing half-applied
        ok.shutdown()
        bad = FieldAnalyser(store, clf, settings=AnalysisSettings(threshold=0.9))
        assert not bad.model.ok and "no false-positive rate at threshold 0.9" in bad.model.error
        with pytest.raises(service.CaptureRefused, match="no false-positive rate"):
            bad.model_info()
        # the message's advice works at once: back to the card's threshold, the model is usable again
        bad.set_threshold(None)
        assert bad.model.ok and bad.model.threshold == 0.979 and bad.model.fp_rate_per_cell == 0.004
        bad.shutdown()
        # a card without the bound (convert's interim cards): its metrics' point estimate, 0 here, never
        # stands in for it, since one flagged cell would then make a slide positive
        point = ModelCard(Path("x.json"), {"name": "m", "threshold": 0.979,
                                           "metrics": {"int8_at_threshold": {"false_positive_rate": 0.0}}})
        unbound = FieldAnalyser(store, SimpleNamespace(**{**vars(clf), "card": point}))
        assert not unbound.model.ok and "no false-positive rate at threshold 0.979" in unbound.model.error
        unbound.shutdown()
    finally:
        store.close()


def test_rejections_alone_do_not_change_the_call_until_the_review_is_complete():
    """2 of 20 flagged cells rejected turned a positive slide NEGATIVE on the result page: the rejected
    cells were false positives already inside the allowance."""
    fp = 0.004090307538499756  # a card's rate (the shipped card's until 2026-12-01)
    slide = _slide(fp)
    base = {"rbc_count": 2000, "infected_count": 20, "fields_used": 15, "fields_rejected": 0}
    auto = service.slide_summary(slide, dict(base, reviewed_infected_count=20,
                                             review={"confirmed": 0, "rejected": 0, "pending": 20}))
    assert auto.call == "positive"
    partial = dict(base, reviewed_infected_count=18, review={"confirmed": 0, "rejected": 2, "pending": 18})
    assert not service.review_is_final(partial)
    during = service.slide_summary(slide, partial, reviewed=True)
    # the call waits for the review; the counts after review leave the rejected cells out at once
    assert during.call == "positive" and "review in progress (18 of 20" in during.call_reason
    assert during.infected_count == 18 and during.parasitemia_pct == pytest.approx(0.9)
    done = dict(base, reviewed_infected_count=0, review={"confirmed": 0, "rejected": 20, "pending": 0})
    after = service.slide_summary(slide, done, reviewed=True)
    assert service.review_is_final(done) and after.call == "negative"
    assert "all 20 flagged cells rejected" in after.call_reason
    # review cannot find the parasites the classifier missed: the detection limit stays the automatic one
    assert after.detection_limit_pct == auto.detection_limit_pct


def test_a_slide_with_nothing_flagged_has_no_result_after_review():
    """Nothing flagged and nothing confirmed: there was no review, so the result after review is the
    automatic one; it must not say "all 0 flagged cells rejected on review"."""
    slide = _slide(0.004090307538499756)
    none = {"rbc_count": 2000, "infected_count": 0, "fields_used": 15, "fields_rejected": 0,
            "reviewed_infected_count": 0, "review": {"confirmed": 0, "rejected": 0, "pending": 0},
            "near": {"cells": 3, "confirmed": 0, "rejected": 0, "pending": 3}}
    assert not service.review_is_final(none)
    after = service.slide_summary(slide, none, reviewed=True)
    assert after.call == service.slide_summary(slide, none).call == "negative"
    assert "rejected on review" not in after.call_reason


def test_a_slide_is_not_closed_without_fields_even_past_the_page_check(tmp_path):
    from device.store import Conflict, Store

    store = Store(tmp_path / "data")
    sid = store.create_slide(sample_id="EMPTY", model=service.ModelInfo("m", "a" * 64, 0.98, 0.004),
                             target_rbc=2000, rbc_per_ul=5e6)
    with pytest.raises(Conflict, match="no fields yet"):
        service.finish_slide(store, sid)
    assert store.get_slide(sid)["status"] == "open"
    store.close()


def test_serve_over_records_from_newer_software_exits_78(tmp_path, caplog):
    """Older software installed over newer records: exit 78, which the unit does not restart (exit 1 made
    systemd retry every 10 s until its start limit)."""
    import sqlite3

    from device import store as store_mod

    (tmp_path / "data").mkdir()
    conn = sqlite3.connect(tmp_path / "data" / store_mod.DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert service.serve(str(_write_config(tmp_path, _free_port()))) == service.EX_CONFIG
    assert "newer than this software" in caplog.text


def test_log_lines_carry_their_priority_for_the_journal(tmp_path):
    """Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority: without it journald
    stored every warning as "info", and `journalctl -p warning` showed none of the service's."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[camera]\nsource = 'webcam'\n")

    def serve_with_stderr_to(path: Path, journal_stream: str | None) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("JOURNAL_STREAM", None)
        with open(path, "w") as err:
            if journal_stream == "this file":  # as systemd does: the "device:inode" of the stream it gave
                st = os.fstat(err.fileno())
                journal_stream = f"{st.st_dev}:{st.st_ino}"
            if journal_stream:
                env["JOURNAL_STREAM"] = journal_stream
            r = subprocess.run([sys.executable, "-m", "device", "serve", "--config", str(bad)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=120)
        assert r.returncode == service.EX_CONFIG
        return path.read_text()

    out = serve_with_stderr_to(tmp_path / "journal.txt", "this file")
    lines = [ln for ln in out.splitlines() if "camera.source" in ln]
    assert lines and all(ln.startswith("<3>ERROR device.service: config error") for ln in lines), out
    for stream in (None, "8:12345"):  # a terminal, or a child whose stderr is not the journal's stream
        out = serve_with_stderr_to(tmp_path / "plain.txt", stream)
        assert "ERROR device.service: config error" in out and "<3>" not in out
    from device.cli import JournalFormatter

    record = logging.LogRecord("device.camera", logging.WARNING, __file__, 1, "camera lost:\nsecond\rline", None,
                               None)
    assert JournalFormatter("%(message)s").format(record) == "<4>camera lost:\n<4>second\rline"


def test_an_upgrade_that_migrates_the_records_asks_systemd_for_time(tmp_path, monkeypatch):
    """Copying and migrating years of records on an SD card can take minutes, past the unit's start
    timeout (120 s), and systemd would kill the service and start it over, again and again."""
    from device import store as store_mod

    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:7])
    store_mod.Store(tmp_path / "data").close()  # records of the previous version
    monkeypatch.undo()
    assert store_mod.pending_migrations(tmp_path / "data") == len(store_mod.MIGRATIONS) - 7
    with served(tmp_path, _write_config(tmp_path, _free_port())) as (proc, notify):
        assert any(m == f"EXTEND_TIMEOUT_USEC={service.MIGRATION_TIMEOUT_S * 1_000_000}" for m in notify.received)
        assert _stop(proc) == 0
    assert store_mod.pending_migrations(tmp_path / "data") == 0
    # an up-to-date database asks for nothing
    with served(tmp_path, _write_config(tmp_path, _free_port()), "notify2") as (proc, notify):
        assert not any("EXTEND_TIMEOUT_USEC" in m for m in notify.received)
        assert _stop(proc) == 0


def test_a_sigterm_during_ready_still_stops_the_service(tmp_path, monkeypatch):
    """sdnotify swallows every exception, the SystemExit of a SIGTERM arriving while READY=1 is sent too:
    a stop right after the start was lost and the service ran on (systemd kills it 30 s later). Here the
    SIGTERM is sent from inside the READY notification, in this (main) thread, as serve() runs under systemd."""
    import sdnotify

    real_notify = sdnotify.SystemdNotifier.notify

    def notify(self, state):
        if state == "READY=1":
            try:  # as sdnotify does around its send
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            except:  # noqa: E722
                pass
            return None
        return real_notify(self, state)

    monkeypatch.setattr(sdnotify.SystemdNotifier, "notify", notify)
    before = signal.getsignal(signal.SIGTERM)
    # never hang the suite: a service that ran on is stopped 15 s later, and that is the failure, told apart
    # from the stop under test by who sent the SIGTERM, not by a clock
    rescued = threading.Event()
    safety = threading.Timer(15, lambda: (rescued.set(), os.kill(os.getpid(), signal.SIGTERM)))
    safety.start()
    try:
        try:
            rc = service.serve(str(_write_config(tmp_path, _free_port())))
        except SystemExit as exc:
            rc = exc.code
    finally:
        safety.cancel()
    assert not rescued.is_set(), "the SIGTERM sent during READY=1 was lost: the service ran on"
    assert rc == 0
    assert signal.getsignal(signal.SIGTERM) == before  # put back as it was


@pytest.mark.parametrize("script", [True, False], ids=["page-script", "no-script-form"])
def test_finish_pressed_while_an_upload_is_being_received_waits_for_that_field(make_env, monkeypatch, script):
    """Tab 1 uploads a field; Finish is pressed in tab 2 while its body is still being parsed (werkzeug spools a
    large upload to a file first: slowed here). The capture registered as being received only once the file was
    parsed, so Finish closed the slide and the field was refused ("slide is finished"). Without the page's
    script the CSRF token is a form field, so the parse happens before the view, in the request hook."""
    import io
    import threading
    import time

    import werkzeug.formparser as formparser

    from tests.conftest import SAMPLES_DIR

    env = make_env()
    c1, c2 = env.app.test_client(), env.app.test_client()
    t1, t2 = env.csrf(c1), env.csrf(c2)
    sid = c1.post("/api/slides", json={"sample_id": "UP-1"}, headers={"X-CSRF-Token": t1}).get_json()["id"]
    real_parse = formparser.MultiPartParser.parse

    def slow_parse(self, *a, **k):
        time.sleep(1.0)
        return real_parse(self, *a, **k)

    monkeypatch.setattr(formparser.MultiPartParser, "parse", slow_parse)
    image = sorted(SAMPLES_DIR.glob("*.jpg"))[1].read_bytes()
    if script:
        def upload():
            return c1.post(f"/api/slides/{sid}/fields", headers={"X-CSRF-Token": t1},
                           content_type="multipart/form-data", data={"image": (io.BytesIO(image), "b.jpg")})
    else:
        def upload():
            return c1.post(f"/slides/{sid}/capture", content_type="multipart/form-data",
                           data={"image": (io.BytesIO(image), "b.jpg"), "csrf_token": t1})
    out = {}
    up = threading.Thread(target=lambda: out.setdefault("upload", upload()))
    up.start()
    time.sleep(0.3)  # the upload is being received; Finish pressed in the other tab
    fin = c2.post(f"/api/slides/{sid}/finish", json={}, headers={"X-CSRF-Token": t2})
    up.join(30)
    assert fin.status_code == 200
    assert out["upload"].status_code in ((201,) if script else (303,))
    fields = env.store.list_fields(sid)
    assert len(fields) == 1 and fields[0]["source"] == "upload"
    assert fin.get_json()["automatic"]["rbc_count"] == fields[0]["rbc_count"] > 0


@pytest.mark.parametrize("where", ["middle", "corner"])
def test_a_review_crop_centres_and_marks_the_judged_cell_without_covering_it(where):
    """At the frame's edge the crop was cut short: the judged cell sat off centre beside whole neighbours, and
    nothing said which cell was meant (a neighbour's parasite confirmed makes a slide positive)."""
    import numpy as np

    from device.imageio import read_rgb
    from device.service import REVIEW_CROP_MARGIN_FRAC, REVIEW_MARK_RGB, review_crop
    from tests.conftest import SAMPLES_DIR

    rgb = read_rgb(sorted(SAMPLES_DIR.glob("*.jpg"))[0])
    x, y, w, h = (700, 500, 90, 96) if where == "middle" else (4, 2, 90, 96)
    crop = review_crop(rgb, (x, y, w, h))
    m = round(max(w, h) * REVIEW_CROP_MARGIN_FRAC)
    assert crop.shape == (h + 2 * m, w + 2 * m, 3)  # the same frame around the cell wherever it lies
    assert np.array_equal(crop[m : m + h, m : m + w], rgb[y : y + h, x : x + w])  # the cell itself, untouched
    marks = np.all(crop == REVIEW_MARK_RGB, axis=2)
    assert marks.sum() > 4 * 0.25 * max(w, h) and not marks[m : m + h, m : m + w].any()
    ys, xs = np.nonzero(marks)  # the marks frame the cell: around its centre
    assert abs(xs.mean() - (m + w / 2)) < 2 and abs(ys.mean() - (m + h / 2)) < 2
    if where == "corner":  # beyond the frame: black, not another part of the field
        assert not crop[: m - 10, : m - 10].any()
