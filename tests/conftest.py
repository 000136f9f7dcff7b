"""Shared fixtures: the real model, the demo fields, and a service wired from real parts in tmp_path."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "device" / "samples"
MODEL_PATH = ROOT / "models" / "cellnet_int8.tflite"
ARTIFACTS_DIR = ROOT / "test-artifacts"
ADMIN_PASSWORD = "microscope-42"


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms until it is true or ``timeout_s`` passes; returns whether it became true."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def damage_a_page(store, table: str, how: str = "garbage") -> int:
    """Damage a leaf page in the middle of ``table`` on disk, as a failing SD card does, and close the
    store's connections (a connection keeps the pages it has read). Returns the page number.

    ``how``: "garbage" overwrites the page (reading it fails); "fragmented" only changes its count of
    fragmented free bytes (every read works; ``quick_check`` reports it as a finding, not an error)."""
    conn = store._conn()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file, none in the WAL
    pages = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' "
                                        "ORDER BY pageno", (table,))]
    assert len(pages) >= 3, f"{table} fills {len(pages)} leaf page(s): too few to damage one in the middle"
    page = pages[len(pages) // 2]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    store.close()
    with open(store.db_path, "r+b") as fh:
        fh.seek(page_size * (page - 1))
        if how == "garbage":
            fh.write(bytes(range(256)) * (page_size // 256))
        else:
            header = bytearray(fh.read(8))
            header[7] = (header[7] + 37) % 256  # the b-tree page header's fragmented-bytes count
            fh.seek(page_size * (page - 1))
            fh.write(header)
    return page


@contextlib.contextmanager
def live_server(app, **settings):
    """``app`` on a real waitress server on 127.0.0.1 and a free port; yields the server.

    Stopped in order, so that no thread of this test lives on into the next and no descriptor is used
    after it was closed:
    - the worker threads end, each after the task it is running (a worker that finished a response pulls
      the server's trigger; pulled after the trigger was closed, that failed with EBADF, or wrote into
      whatever file had been given that descriptor number since);
    - in the server's own thread, every connection and the listening socket close, and its loop ends;
    - the trigger closes last, from this thread, once the loop has ended: closed in the loop thread, it
      could be closed while this thread was still writing to it (a worker's earlier pull woke the loop).
    A response the client has not read is not waited for: the tests read theirs.
    """
    import waitress
    from waitress import wasyncore

    server = waitress.create_server(app, host="127.0.0.1", port=0, **settings)
    loop = threading.Thread(target=server.run, daemon=True, name="waitress-loop")
    loop.start()
    try:
        yield server
    finally:
        server.task_dispatcher.shutdown(timeout=10)

        def close_but_the_trigger():  # in the loop thread
            for d in list(server._map.values()):
                if d is server:
                    wasyncore.dispatcher.close(server)  # server.close() closes the trigger too
                elif d is not server.trigger:
                    d.close()
            server._map.clear()  # the loop ends

        server.trigger.pull_trigger(close_but_the_trigger)
        loop.join(10)
        server.trigger.close()
    assert not loop.is_alive(), "the test server's loop did not end"  # (not over a failure of the test itself)


@functools.cache
def admin_hash() -> str:
    """A hash of ADMIN_PASSWORD for security.admin_password_hash; few iterations, so tests stay fast."""
    from werkzeug.security import generate_password_hash

    return generate_password_hash(ADMIN_PASSWORD, method="pbkdf2:sha256:1000")


@pytest.fixture(scope="session")
def classifier():
    from device.classifier import CellClassifier

    return CellClassifier(MODEL_PATH)


def make_config(data_dir: Path, **sections):
    """A validated Config for tests: replay over the demo fields (fast), data in ``data_dir``."""
    from device.config import from_dict

    data = {"service": {"data_dir": str(data_dir), "min_free_disk_mb": 0},
            "camera": {"source": "replay", "replay_path": str(SAMPLES_DIR), "replay_fps": 20.0,
                       "reconnect_max_s": 1.0}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data)


def wait_new_view(env, slide_id: int = 1, timeout_s: float = 10.0) -> None:
    """Wait until the camera shows a view other than the one last counted into the slide or one still being
    analysed (the replay camera's stand-in for moving the stage): a capture of such a view is refused."""
    from device.camera import same_view, thumbnail

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = env.app.extensions.get("malaria_detect_counted_views")
        taken = [] if views is None else [*(v for v, _ in views.counted.get(slide_id, {}).values()),
                                          *views.inflight.get(slide_id, [])]
        f = env.feed.latest()
        if f is not None and f.rgb is not None and not any(same_view(v, thumbnail(f.rgb)) for v in taken):
            return
        time.sleep(0.02)
    raise AssertionError("the camera showed no new view")


def capture_new_view(env, post, slide_id: int = 1):
    """``post()`` a capture once the camera shows a new view, again if the frame taken at that moment was
    the counted one after all (the replay cycles its pictures 20 times a second: it can come round
    between the check and the request, and is then rightly refused as counted)."""
    for _ in range(5):
        wait_new_view(env, slide_id)
        r = post()
        if r.status_code != 409 or b"already counted" not in r.data:
            return r
    return r


@dataclass
class Env:
    config: object
    store: object
    feed: object
    analyser: object
    app: object

    def csrf(self, client) -> str:
        return client.get("/api/session").get_json()["csrf_token"]

    @property
    def deps(self):
        return self.app.extensions["malaria_detect"]

    def admin_client(self, password: str = ADMIN_PASSWORD):
        """A test client signed in as admin (the env needs ``security={"admin_password_hash": admin_hash()}``).

        Returns (client, csrf token of the signed-in session).
        """
        c = self.app.test_client()
        r = c.post("/admin/login", data={"password": password, "csrf_token": self.csrf(c)})
        assert r.status_code == 303, r.get_data(as_text=True)
        return c, self.csrf(c)


class _FlagAll:
    """The real classifier with every score raised to at least its threshold: every cell is flagged."""

    def __init__(self, clf):
        self._clf = clf

    def __getattr__(self, name):
        return getattr(self._clf, name)

    def predict(self, batch):
        import numpy as np

        return np.maximum(self._clf.predict(batch), self._clf.threshold)


@pytest.fixture
def make_env(tmp_path, classifier):
    """Build the service from real parts (SQLite in tmp_path, replay camera, TFLite model).

    ``flag_all=True`` raises every cell's score to at least the card's threshold so every counted cell is
    flagged, whatever the model: tests of the review flow must not depend on the model's scores. (A
    threshold of 0 would do it too, but the card gives no false-positive rate there: no slide call.)
    """
    from device.analysis import AnalysisSettings
    from device.camera import CameraFeed, ReplayCamera
    from device.service import FieldAnalyser
    from device.store import Store
    from device.web import create_app

    made: list[Env] = []

    def build(*, flag_all: bool = False, model_ok: bool = True, open_camera=None, **sections) -> Env:
        cfg = make_config(tmp_path / f"data{len(made)}", **sections)
        store = Store(cfg.service.data_dir)
        opener = open_camera or (lambda: ReplayCamera(cfg.camera.replay_path, cfg.camera.replay_fps))
        feed = CameraFeed(opener, reconnect_max_s=cfg.camera.reconnect_max_s, min_focus=cfg.analysis.min_focus,
                          source="replay", reconnect_min_s=0.05).start()
        settings = AnalysisSettings(min_focus=cfg.analysis.min_focus)
        common = {"save_raw": cfg.service.save_raw_frames, "min_free_disk_mb": cfg.service.min_free_disk_mb}
        clf = _FlagAll(classifier) if flag_all else classifier
        analyser = (FieldAnalyser(store, clf, settings=settings, **common) if model_ok
                    else FieldAnalyser(store, None, model_error="model file missing: /nowhere/model.tflite", **common))
        app = create_app(cfg, store, feed, analyser)
        app.config["TESTING"] = True
        env = Env(cfg, store, feed, analyser, app)
        made.append(env)
        return env

    yield build
    for env in made:
        env.feed.stop()
        env.analyser.shutdown()
        env.store.close()
