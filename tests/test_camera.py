"""Cameras: channel order on real pixels through each path, replay looping, loss and reconnection."""

from __future__ import annotations

import shutil
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from device import camera as cam_mod
from device.camera import CameraBase, CameraError, CameraFeed, OpenCVCamera, Picamera2Camera, ReplayCamera, open_camera
from tests.conftest import SAMPLES_DIR, make_config, wait_until

RED_BGR = (0, 0, 255)


def _assert_red(rgb: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    r, g, b = (float(rgb[..., i].mean()) for i in range(3))
    assert r > 200 and g < 50 and b < 50, f"expected red in RGB order, got mean R={r:.0f} G={g:.0f} B={b:.0f}"


def _solid_bgr(color_bgr, w=64, h=48) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = color_bgr
    return img


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def _small_fields(folder: Path, n: int = 2) -> Path:
    """Real demo fields, shrunk so the feed loop is fast."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(SAMPLES_DIR.glob("*.jpg"))[:n]:
        img = cv2.imread(str(src))
        cv2.imwrite(str(folder / src.name), cv2.resize(img, (400, 300), interpolation=cv2.INTER_AREA))
    return folder


# --- channel order on real pixels -------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_replay_folder_red_image_comes_out_red(tmp_path, suffix):
    cv2.imwrite(str(tmp_path / f"red{suffix}"), _solid_bgr(RED_BGR))
    with ReplayCamera(tmp_path, fps=60) as cam:
        _assert_red(cam.read())


def test_replay_video_red_comes_out_red_and_loops(tmp_path):
    video = _write_video(tmp_path / "red.avi", [_solid_bgr(RED_BGR)] * 3)
    with ReplayCamera(video, fps=60) as cam:
        for _ in range(7):  # past the end of the 3-frame file: it loops
            _assert_red(cam.read())


def test_opencv_camera_path_converts_bgr_to_rgb(tmp_path):
    # A video file through cv2.VideoCapture is the same decode path as a V4L2 device, minus the device.
    video = _write_video(tmp_path / "red.avi", [_solid_bgr(RED_BGR)] * 2)
    with OpenCVCamera(str(video)) as cam:
        _assert_red(cam.read())


class _FrameCapture:
    """Stands in for cv2.VideoCapture of a V4L2 node that delivers one given frame."""

    def __init__(self, frame):
        self.frame = frame
        self.decoded_under_lock: list[bool] = []

    def grab(self):  # waiting for the frame: no JPEG decoding, so no upload is held up meanwhile
        from device.imageio import JPEG_DECODE_LOCK

        assert not JPEG_DECODE_LOCK.locked()
        return True

    def retrieve(self):  # decoding an MJPG frame: libjpeg, whose warnings an upload's check listens for
        from device.imageio import JPEG_DECODE_LOCK

        self.decoded_under_lock.append(JPEG_DECODE_LOCK.locked())
        return True, self.frame.copy()

    def read(self):
        return True, self.frame.copy()

    def release(self):
        pass


def test_opencv_camera_four_channel_frame_is_rgb_and_a_grayscale_frame_is_a_bad_frame(tmp_path):
    from device.camera import check_frame

    video = _write_video(tmp_path / "red.avi", [_solid_bgr(RED_BGR)] * 2)
    with OpenCVCamera(str(video)) as cam:
        cam._cap = _FrameCapture(np.dstack([_solid_bgr(RED_BGR), np.zeros((48, 64), np.uint8)]))  # XBGR padding
        _assert_red(check_frame(cam.read())[0])
        assert cam._cap.decoded_under_lock == [True]
        cam._cap = _FrameCapture(np.full((48, 64), 90, np.uint8))
        frame, problem = check_frame(cam.read())  # the camera is there: not "lost", a frame to reject
        assert frame is None and "grayscale" in problem


def test_opencv_camera_missing_device_is_a_camera_error(tmp_path):
    with pytest.raises(CameraError, match="no camera"):
        OpenCVCamera(str(tmp_path / "no-such-video.avi"))


class _FakePicamera2:
    """Mimics picamera2's memory layout: "BGR888" frames are R, G, B in memory, "RGB888" are B, G, R."""

    instances: list[_FakePicamera2] = []
    scene_rgb = (255, 0, 0)  # the microscope sees red

    def __init__(self):
        self.format = None
        self.started = self.closed = False
        _FakePicamera2.instances.append(self)

    def create_video_configuration(self, main):
        return {"main": dict(main)}

    def configure(self, config):
        self.format = config["main"]["format"]
        self.size = config["main"]["size"]

    def start(self):
        self.started = True

    def capture_array(self, name="main"):
        w, h = self.size
        memory_order = {"BGR888": self.scene_rgb, "RGB888": self.scene_rgb[::-1]}[self.format]
        frame = np.empty((h, w, 3), np.uint8)
        frame[:] = memory_order
        return frame

    def stop(self):
        self.started = False

    def close(self):
        self.closed = True


@pytest.fixture
def fake_picamera2(monkeypatch):
    module = types.ModuleType("picamera2")
    module.Picamera2 = _FakePicamera2
    _FakePicamera2.instances = []
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return module


def test_picamera2_asks_for_bgr888_and_red_stays_red(fake_picamera2):
    with Picamera2Camera(320, 240) as cam:
        frame = cam.read()
    fake = _FakePicamera2.instances[0]
    assert fake.format == "BGR888"  # pinned: R, G, B in memory
    assert frame.shape == (240, 320, 3)
    _assert_red(frame)
    assert fake.closed


def test_picamera2_no_camera_attached_is_a_camera_error(monkeypatch, fake_picamera2):
    def no_camera(self):
        raise IndexError("list index out of range")  # what Picamera2() raises with no camera

    monkeypatch.setattr(_FakePicamera2, "__init__", no_camera)
    with pytest.raises(CameraError, match="Raspberry Pi camera not available"):
        Picamera2Camera()


def test_picamera2_not_installed_is_a_camera_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import raises ImportError
    with pytest.raises(CameraError, match="picamera2 is not installed"):
        Picamera2Camera()


@pytest.mark.pi
def test_real_pi_camera_gives_rgb_frames():
    model = Path("/proc/device-tree/model")
    if not (model.exists() and "Raspberry Pi" in model.read_text(errors="ignore")):
        pytest.skip("not a Raspberry Pi")
    pytest.importorskip("picamera2")
    with Picamera2Camera(640, 480) as cam:
        frame = cam.read()
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8


# --- replay behaviour ---------------------------------------------------------------------------

def test_replay_folder_real_fields_in_order_and_looping():
    files = sorted(SAMPLES_DIR.glob("*.jpg"))
    with ReplayCamera(SAMPLES_DIR, fps=60) as cam:
        frames = [cam.read() for _ in range(len(files) + 1)]
    first = cv2.cvtColor(cv2.imread(str(files[0])), cv2.COLOR_BGR2RGB)
    assert frames[0].shape == (1200, 1600, 3)
    assert np.array_equal(frames[0], first)
    assert np.array_equal(frames[len(files)], first)  # looped
    assert not np.array_equal(frames[0], frames[1])


def test_replay_is_paced_at_its_frame_rate(tmp_path, monkeypatch):
    import device.camera as camera_module

    class Clock:  # a fake clock: reading a frame takes no time, sleeping moves the clock on
        now, sleeps = 100.0, []

        def monotonic(self):
            return self.now

        def sleep(self, s):
            self.sleeps.append(s)
            self.now += s

    clock = Clock()
    monkeypatch.setattr(camera_module, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    cv2.imwrite(str(tmp_path / "a.png"), _solid_bgr(RED_BGR))
    with ReplayCamera(tmp_path, fps=20) as cam:
        for _ in range(5):
            cam.read()
    # the first frame at once, then one every 1/20 s, like a camera running at 20 fps
    assert clock.sleeps == pytest.approx([0.05] * 4)


def test_a_replay_hold_shows_each_picture_still_until_the_stage_moves(monkeypatch):
    """The demo replayed a new picture on every frame: the page's auto-capture (a view steady for 1 s) never
    fired. Held, a picture's frames repeat for hold_s, then the next picture comes, in order."""
    import device.camera as camera_module
    from device.camera import STEADY_MIN_S
    from device.config import DEMO_REPLAY_HOLD_S, load_config

    class Clock:
        now = 100.0

        def monotonic(self):
            return self.now

        def sleep(self, s):
            self.now += s

    clock = Clock()
    monkeypatch.setattr(camera_module, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    files = sorted(SAMPLES_DIR.glob("*.jpg"))
    cam = ReplayCamera(SAMPLES_DIR, fps=4, hold_s=1.5)
    frames = [cam.read() for _ in range(13)]  # 3 s at 4 frames/s
    pictures = [next(i for i, f in enumerate(files) if np.array_equal(fr, cv2.cvtColor(cv2.imread(str(f)),
                                                                                      cv2.COLOR_BGR2RGB)))
                for fr in frames]
    assert pictures == [0] * 6 + [1] * 6 + [2]  # 1.5 s of each: frames at 0, 0.25 ... 1.25 s
    assert frames[1] is not frames[0]  # a copy: whoever changes a frame does not change the next
    frames[1][:] = 0
    assert np.array_equal(cam.read(), frames[12])  # the held picture is untouched
    # the demo holds a picture long enough for a steady view, and the config reaches the camera
    demo = load_config(None).camera
    assert demo.replay_hold_s == DEMO_REPLAY_HOLD_S >= 2 * STEADY_MIN_S
    assert camera_module.open_camera(demo).hold_s == DEMO_REPLAY_HOLD_S
    assert ReplayCamera(SAMPLES_DIR, fps=60).hold_s == 0


def test_replay_skips_an_unreadable_file(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _solid_bgr(RED_BGR))
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    with ReplayCamera(tmp_path, fps=60) as cam:
        for _ in range(3):
            _assert_red(cam.read())


def test_replay_skips_a_picture_over_the_services_25_mp_with_the_reason(tmp_path, caplog):
    """A replay folder's pictures are the service's fields, as uploads are: over 25 MP (the service's memory
    for a field) one is skipped, said why in the log, not decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    big = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5001, 5000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    (tmp_path / "a_big.png").write_bytes(big)  # 25.005 MP: its header says so
    cv2.imwrite(str(tmp_path / "b.png"), _solid_bgr(RED_BGR))
    with caplog.at_level("WARNING", logger="device.camera"), ReplayCamera(tmp_path, fps=60) as cam:
        for _ in range(3):
            _assert_red(cam.read())
    assert "25.005 MP, over the 25 MP limit of the device's fields" in caplog.text


def test_replay_reads_a_large_jpeg_of_large_cells_reduced(tmp_path):
    """As an upload: a colour JPEG over 25 MP whose cells stay at least 96 px across at 1/2 is decoded at 1/2
    (never held whole), not skipped; the frame is what would be analysed."""
    from tests.conftest import SAMPLES_DIR

    field = cv2.imread(str(sorted(SAMPLES_DIR.glob("*.jpg"))[0]))  # 1600 x 1200, cells ~100 px
    big = cv2.resize(field, (6600, 4950), interpolation=cv2.INTER_LINEAR)  # 32.7 MP
    cv2.imwrite(str(tmp_path / "big.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    with ReplayCamera(tmp_path, fps=60) as cam:
        frame = cam.read()
    assert frame.shape == (2475, 3300, 3)
    half = cv2.resize(big, (3300, 2475), interpolation=cv2.INTER_AREA)
    assert np.abs(frame.astype(int) - half[..., ::-1]).mean() < 3  # the picture, in RGB


def test_a_picture_read_at_half_has_the_thumbnail_of_the_picture_decoded_whole():
    """A 4600 x 3493 JPEG read at 1/2 is 2300 x 1747: its thumbnail came out a row taller than the same
    picture's decoded whole (uploaded again as a PNG), views of two shapes are never compared, and the field
    was counted twice. The thumbnail now takes the picture's shape, turned ones too."""
    from device.camera import same_view, thumbnail, turned_views
    from device.imageio import decode_field, decode_rgb
    from tests.conftest import SAMPLES_DIR

    field = cv2.imread(str(sorted(SAMPLES_DIR.glob("*.jpg"))[0]))
    data = cv2.imencode(".jpg", cv2.resize(field, (4600, 3493), interpolation=cv2.INTER_LINEAR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    half, factor, size = decode_field(data)
    whole = decode_rgb(data)
    assert factor == 2 and half.shape == (1747, 2300, 3) and size == (4600, 3493)
    assert thumbnail(half).shape != thumbnail(whole).shape  # the shapes the two decodes give by themselves
    assert same_view(thumbnail(half, size), thumbnail(whole))
    for a, b in zip(turned_views(half, size), turned_views(whole), strict=True):
        assert same_view(a, b)


@pytest.mark.parametrize("setup, match", [
    (lambda p: p / "missing", "not found"),
    (lambda p: p, "no images"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a folder or a video"),
])
def test_replay_refuses_what_it_cannot_play(tmp_path, setup, match):
    with pytest.raises(CameraError, match=match):
        ReplayCamera(setup(tmp_path))


def test_open_camera_follows_config(tmp_path, fake_picamera2):
    cfg = make_config(tmp_path)
    with open_camera(cfg.camera) as cam:
        assert isinstance(cam, ReplayCamera)
    with open_camera(cfg.with_changes("camera", source="picamera2").camera) as cam:
        assert isinstance(cam, Picamera2Camera)
    with pytest.raises(CameraError):
        open_camera(cfg.with_changes("camera", source="opencv", device=str(tmp_path / "none.avi")).camera)


# --- the feed: loss, reconnection, back-off -------------------------------------------------------


def test_feed_survives_a_replay_folder_renamed_mid_slide_and_reconnects(tmp_path):
    folder = _small_fields(tmp_path / "fields")
    feed = CameraFeed(lambda: ReplayCamera(folder, fps=30), reconnect_max_s=0.2, reconnect_min_s=0.05,
                      source="replay").start()
    try:
        assert wait_until(lambda: feed.connected and feed.latest() is not None, timeout_s=5.0)
        assert feed.status()["state"] == "connected"
        folder.rename(tmp_path / "moved")  # the camera disappears mid-slide
        assert wait_until(lambda: feed.status()["state"] == "disconnected", timeout_s=5.0)
        assert feed.status()["fps"] == 0  # no pictures, no rate (the last one's was shown while lost)
        st = feed.status()
        assert feed.latest() is None and st["message"] and st["reconnects"] >= 1
        assert feed.loop_healthy()  # the loop keeps turning while it waits
        (tmp_path / "moved").rename(folder)  # plugged back in
        assert wait_until(lambda: feed.status()["state"] == "connected" and feed.latest() is not None, timeout_s=5.0)
    finally:
        feed.stop()
    assert not feed.loop_healthy()


class _FlakyCamera(CameraBase):
    def __init__(self, frames_before_failure: int):
        self.left = frames_before_failure

    def read(self):
        if self.left <= 0:
            raise CameraError("USB camera unplugged")
        self.left -= 1
        time.sleep(0.005)
        return np.full((48, 64, 3), 128, np.uint8)

    def close(self):
        pass


def _recording_waits(feed: CameraFeed, states: list[str] | None = None) -> list[float]:
    """Replace the feed's back-off sleep by a record of what it asked for: the schedule, not the clock.

    With ``states``, the feed's state during each back-off is recorded too: read from the polling
    test thread it would race the loop, which passes through "connecting" on every retry.
    """
    waits: list[float] = []

    def wait(seconds):
        if states is not None:
            states.append(feed.status()["state"])
        waits.append(round(seconds, 6))
        time.sleep(0.001)  # keep the loop from spinning flat out while the test polls

    feed._wait = wait
    return waits


def test_feed_reconnect_back_off_doubles_and_is_capped():
    def opener():
        raise CameraError("no camera at '0'")

    feed = CameraFeed(opener, reconnect_max_s=0.2, reconnect_min_s=0.025, focus=lambda rgb: 100.0)
    waits = _recording_waits(feed)
    feed.start()
    try:
        assert wait_until(lambda: len(waits) >= 6, timeout_s=5)
        st = feed.status()
        assert st["state"] == "disconnected" and "no camera" in st["message"]
    finally:
        feed.stop()
    assert waits[:6] == [0.025, 0.05, 0.1, 0.2, 0.2, 0.2]  # doubles from the minimum, capped at the maximum


def test_feed_backs_off_from_a_camera_that_opens_but_gives_no_frame(caplog):
    opens: list[int] = []

    class _Silent(CameraBase):  # an empty replay, a V4L2 node that never streams
        def read(self):
            raise CameraError("stopped delivering frames")

        def close(self):
            pass

    def opener():
        opens.append(1)
        return _Silent()

    feed = CameraFeed(opener, reconnect_max_s=0.2, reconnect_min_s=0.025, focus=lambda rgb: 100.0)
    states: list[str] = []
    waits = _recording_waits(feed, states)
    feed.start()
    try:
        assert wait_until(lambda: len(waits) >= 6, timeout_s=5)
    finally:
        feed.stop()
    assert set(states[:6]) == {"disconnected"}  # it says so while it waits to retry
    lost = [r for r in caplog.records if r.name == "device.camera" and "camera lost" in r.getMessage()]
    assert len(lost) == 1  # logged once, not once per retry
    assert feed.status()["reconnects"] == 0  # never connected, so never lost (it read 7 after 6 s)
    # one wait per failed open, the same doubling, capped back-off (it was a busy loop)
    assert waits[:6] == [0.025, 0.05, 0.1, 0.2, 0.2, 0.2]
    assert len(opens) in (len(waits), len(waits) + 1)


def test_feed_recovers_from_a_camera_that_raises(tmp_path):
    opened = []

    def opener():
        opened.append(1)
        if len(opened) == 2:
            raise CameraError("still gone")
        return _FlakyCamera(frames_before_failure=5)

    feed = CameraFeed(opener, reconnect_max_s=0.1, reconnect_min_s=0.01, focus=lambda rgb: 100.0).start()
    try:
        assert wait_until(lambda: len(opened) >= 3 and feed.status()["reconnects"] >= 2, timeout_s=5.0)
        assert wait_until(lambda: feed.latest() is not None, timeout_s=5.0)
    finally:
        feed.stop()


def test_feed_reports_focus_steadiness_and_serves_a_cached_preview(tmp_path, monkeypatch):
    monkeypatch.setattr(cam_mod, "STEADY_MIN_S", 0.2)
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(sorted(SAMPLES_DIR.glob("*.jpg"))[0], folder)  # the same field again and again: a still stage
    feed = CameraFeed(lambda: ReplayCamera(folder, fps=20), min_focus=2.4).start()
    try:
        assert wait_until(lambda: feed.status()["steady"], timeout_s=5)
        st = feed.status()
        assert st["focus"] and st["focus"] > 2.4 and st["sharp"] is True and st["scene"] == 1
        seq, jpeg = feed.preview_jpeg()
        assert jpeg[:2] == b"\xff\xd8"
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[1] == 960
        frame = feed.wait_frame(after_seq=seq, timeout_s=2)
        assert frame is not None and frame.seq > seq
    finally:
        feed.stop()


def _fields_rgb() -> list[np.ndarray]:
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(SAMPLES_DIR.glob("*.jpg"))]


@pytest.mark.parametrize("dx,dy", [(300, 0), (0, 225), (-240, 180), (120, -90), (360, 150)])
def test_how_far_the_stage_moved_gives_the_share_two_views_have_in_common(dx, dy):
    from device.camera import thumbnail, view_overlap

    rgb = _fields_rgb()[0]
    h, w = 900, 1200  # two windows of one real field, the second moved by (dx, dy)
    x0, y0 = max(0, -dx), max(0, -dy)
    a = thumbnail(rgb[y0:y0 + h, x0:x0 + w])
    b = thumbnail(rgb[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w])
    true = (1 - abs(dx) / w) * (1 - abs(dy) / h)
    assert view_overlap(a, b) == pytest.approx(true, abs=0.03)
    assert view_overlap(b, a) == pytest.approx(true, abs=0.03)


def test_views_that_share_nothing_or_did_not_move_have_no_overlap():
    from device.camera import thumbnail, view_overlap

    fields = _fields_rgb()
    assert len(fields) >= 2
    views = [thumbnail(f[:900, :1200]) for f in fields]
    for i, a in enumerate(views):
        for j, b in enumerate(views):
            if i != j:
                assert view_overlap(a, b) == 0.0, (i, j)  # two different fields
        assert view_overlap(a, a) == 0.0  # an unmoved stage is same_view's case, not an overlap
    a = fields[0]
    assert view_overlap(thumbnail(a[:600, :800]), thumbnail(a[600:1200, 800:1600])) == 0.0  # side by side
    assert view_overlap(views[0], views[0][:50]) == 0.0  # different sizes


def test_a_demo_replay_turns_each_pass_so_few_pictures_make_many_fields(tmp_path):
    from device.camera import same_view, thumbnail
    from device.config import load_config

    shutil.copy(sorted(SAMPLES_DIR.glob("*.jpg"))[0], tmp_path / "only.jpg")
    cam = ReplayCamera(tmp_path, fps=60, turns=True)
    views = [thumbnail(cam.read()) for _ in range(9)]
    for i in range(8):  # eight different views of one picture...
        for j in range(i):
            assert views[i].shape != views[j].shape or not same_view(views[i], views[j]), (i, j)
    assert same_view(views[8], views[0])  # ...then the first again
    plain = ReplayCamera(tmp_path, fps=60)  # recorded fields are replayed as they are
    assert np.array_equal(plain.read(), plain.read())
    assert load_config(None).camera.replay_turns is True  # the demo
    assert make_config(tmp_path / "d").camera.replay_turns is False


def _camera_messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "device.camera" and text in r.getMessage()]


def test_a_camera_lost_again_after_unusable_frames_is_logged_again(caplog):
    """lost, then frames that cannot be used, then lost again with the same message: the second loss is a
    change an admin must see in the log (it ended on "frames unusable" while the camera was gone)."""
    import logging

    caplog.set_level(logging.INFO, logger="device.camera")
    script = iter(["fail", "bad", "bad", "fail"] + ["ok"] * 10_000)

    class _Cam(CameraBase):
        def read(self):
            step = next(script)
            if step == "fail":
                raise CameraError("camera '0' stopped delivering frames")
            if step == "bad":
                return np.zeros((480, 640), np.uint8)  # one channel: unusable
            return np.full((480, 640, 3), 128, np.uint8)

        def close(self):
            pass

    feed = CameraFeed(lambda: _Cam(), reconnect_max_s=0.05, reconnect_min_s=0.01, focus=lambda rgb: 100.0).start()
    try:
        assert wait_until(lambda: feed.status()["state"] == "connected", timeout_s=10)
    finally:
        feed.stop()
    assert len(_camera_messages(caplog, "camera lost")) == 2
    assert _camera_messages(caplog, "frames unusable")


def test_another_camera_source_failing_alike_is_logged(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="device.camera")

    def failing():
        raise CameraError("picamera2 is not installed")

    feed = CameraFeed(failing, reconnect_max_s=0.05, reconnect_min_s=0.01, focus=lambda rgb: 100.0).start()
    try:
        assert wait_until(lambda: len(_camera_messages(caplog, "camera unavailable")) == 1, timeout_s=5)
        feed.reopen(failing, "csi:1")
        assert wait_until(lambda: len(_camera_messages(caplog, "camera unavailable")) == 2, timeout_s=5)
    finally:
        feed.stop()


def test_a_camera_that_opens_but_never_sends_a_frame_does_not_read_as_reconnected(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="device.camera")
    opens: list[int] = []

    class _Silent(CameraBase):
        def read(self):
            raise CameraError("stopped delivering frames")

        def close(self):
            pass

    feed = CameraFeed(lambda: (opens.append(1), _Silent())[1], reconnect_max_s=0.05, reconnect_min_s=0.01,
                      focus=lambda rgb: 100.0).start()
    try:
        assert wait_until(lambda: len(opens) >= 6, timeout_s=5)
    finally:
        feed.stop()
    assert len(_camera_messages(caplog, "camera lost")) == 1
    assert not _camera_messages(caplog, "reconnected")  # opened again and again, never with a frame


def test_a_stage_creeping_a_little_each_frame_is_not_steady(monkeypatch):
    """Steadiness compared each frame with the one before: at 30 fps a stage moving 4% of the view a second
    read as still after 1 s, and auto-capture fired mid-move."""
    clock = [1000.0]
    monkeypatch.setattr(cam_mod.time, "monotonic", lambda: clock[0])
    feed = CameraFeed(lambda: None, focus=lambda rgb: 3.0)
    rgb = _fields_rgb()[0]
    h, w = rgb.shape[:2]
    steady = []
    for i in range(75):  # 2.5 s at 30 fps, 24 px a second across a 1200 px view (2%), smoothly
        clock[0] += 1 / 30
        moved = cv2.warpAffine(rgb, np.float32([[1, 0, -i * 24 / 30], [0, 1, 0]]), (w, h))[:900, :1200]
        feed._on_frame(np.ascontiguousarray(moved))
        steady.append(feed.status()["steady"])
    assert not any(steady)  # frame to frame it read as still for the last 44 of these 75 frames
    for _ in range(45):  # then the stage stops: still after STEADY_MIN_S
        clock[0] += 1 / 30
        feed._on_frame(np.ascontiguousarray(moved))
    assert feed.status()["steady"]


def test_the_overlap_check_leaves_the_counted_views_as_they_were():
    """Given a window, OpenCV 4.11's phaseCorrelate multiplies its inputs by it in place: the counted fields'
    prepared views shrank at every comparison, and soon every new field 'overlapped' one (40 of 60)."""
    from device.camera import prepare_view, prepared_overlap, thumbnail

    rgb = _fields_rgb()[0]
    a, b = prepare_view(thumbnail(rgb[:900, :1200])), prepare_view(thumbnail(rgb[:900, 300:1500]))
    a0, b0 = a.copy(), b.copy()
    first = prepared_overlap(a, b)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)
    assert [prepared_overlap(a, b) for _ in range(20)] == [first] * 20 and first == pytest.approx(0.75, abs=0.03)
    others = [prepare_view(thumbnail(f[:900, :1200])) for f in _fields_rgb()[1:]]
    for _ in range(30):  # a slide's counted views compared with many new fields: none comes to match
        assert all(prepared_overlap(o, a) == 0.0 for o in others)


@pytest.mark.parametrize("change", ["lamp +5%", "lamp -5%", "drift 4 px", "drift 7 px", "refocus + 3 px drift",
                                    "JPEG q75", "drift 6 px both ways", "drift 8 px both ways"])
def test_the_same_field_captured_again_after_a_small_change_is_the_same_view(change):
    """A lamp change of 3% or a drift of 4 px (under one thumbnail pixel: no overlap either) counted a field
    again without a word; different fields stay apart."""
    from device.camera import same_view, thumbnail

    fields = _fields_rgb()
    rgb = fields[0]
    win = rgb[100:1000, 100:1300].astype(np.float32)
    moved = {"lamp +5%": win * 1.05, "lamp -5%": win * 0.95, "drift 4 px": rgb[100:1000, 104:1304],
             "drift 7 px": rgb[103:1003, 107:1307],
             # 0.6-1.0 thumbnail px: aligned, 3.5-5.2 gray levels apart, over the limit of 4, and too
             # little moved for the overlap warning: counted twice (a technician's upload, found in review)
             "drift 6 px both ways": rgb[106:1006, 106:1306], "drift 8 px both ways": rgb[108:1008, 108:1308],
             "refocus + 3 px drift": cv2.GaussianBlur(rgb[100:1000, 103:1303], (0, 0), 1.0)}.get(change)
    if change == "JPEG q75":
        moved = cv2.imdecode(cv2.imencode(".jpg", rgb[100:1000, 100:1300], [cv2.IMWRITE_JPEG_QUALITY, 75])[1], 1)
    again = np.clip(moved, 0, 255).astype(np.uint8)
    assert same_view(thumbnail(np.ascontiguousarray(rgb[100:1000, 100:1300])), thumbnail(again))
    views = [thumbnail(np.ascontiguousarray(f[:900, :1200])) for f in fields]
    assert not any(same_view(views[i], views[j]) for i in range(len(views)) for j in range(len(views)) if i != j)


def test_no_drift_falls_between_already_counted_and_the_overlap_warning():
    """Every drift of a window is either the same view (refused as already counted) or an overlap (warned
    of): 6-8 px both ways of a 1,536 px upload was neither, and its cells counted twice without a word."""
    from device.camera import same_view, thumbnail, view_overlap

    for rgb in _fields_rgb():
        first = thumbnail(np.ascontiguousarray(rgb[:900, :1200]))
        for d in range(0, 25):
            again = thumbnail(np.ascontiguousarray(rgb[d : 900 + d, d : 1200 + d]))
            assert same_view(first, again) or view_overlap(again, first) > 0.9, d


@pytest.mark.parametrize("pictures", [10, 1])
def test_a_camera_stuck_in_read_is_said_to_have_stalled_and_its_last_picture_is_not_captured(make_env, pictures):
    """A driver stuck in read() left the page saying "connected, steady, sharp" over a frozen picture for
    20 s, until the watchdog, and Capture stored that picture as the field under the objective. Also when
    it hangs after its first picture (just connected or reconnected: no frame rate measured yet)."""
    import threading

    release = threading.Event()

    class Stuck:
        def __init__(self):
            self.n = 0

        def read(self):
            self.n += 1
            if self.n > pictures:
                release.wait(30)  # the driver never answers again
            time.sleep(0.02)
            return _fields_rgb()[0]

        def close(self):
            release.set()

    env = make_env(open_camera=Stuck)
    try:
        assert env.feed.wait_frame(0, timeout_s=10) is not None
        assert wait_until(lambda: env.feed.status()["state"] == "stalled", timeout_s=15)
        st = env.feed.status()
        assert "no new picture for" in st["message"] and st["steady"] is False
        c = env.app.test_client()
        token = env.csrf(c)
        assert c.post("/api/slides", json={"sample_id": "S-STUCK"}, headers={"X-CSRF-Token": token}).status_code == 201
        r = c.post("/api/slides/1/fields", headers={"X-CSRF-Token": token})
        assert r.status_code == 503 and "no new picture" in r.get_json()["error"]
        assert env.store.totals(1)["fields"] == 0
    finally:
        release.set()


def test_a_flickering_lamp_or_a_settling_exposure_is_no_movement(monkeypatch):
    """Compared with the frame the stage came to rest on, +-2% lamp flicker read as movement 90% of the time
    and started new scenes (auto-capture tried again, and was told "already counted")."""
    clock = [1000.0]
    monkeypatch.setattr(cam_mod.time, "monotonic", lambda: clock[0])
    feed = CameraFeed(lambda: None, focus=lambda rgb: 3.0)
    rgb = _fields_rgb()[0][:900, :1200].astype(np.float32)
    steady = []
    for i in range(240):  # 8 s at 30 fps: +-2% at 0.5 Hz, and the exposure settling 3% up over the first 2 s
        clock[0] += 1 / 30
        gain = (1 + 0.02 * np.sin(2 * np.pi * 0.5 * i / 30)) * (1 + 0.03 * min(1.0, i / 60))
        feed._on_frame(np.clip(rgb * gain, 0, 255).astype(np.uint8))
        steady.append(feed.status()["steady"])
    assert feed.status()["scene"] == 1 and sum(steady) >= 0.8 * len(steady)


def test_thin_fields_of_few_cells_are_not_taken_for_one_another():
    """In a thin area two different fields of 10 cells on bare plasma differ by little in gray levels: 171 of
    2,016 such pairs made from the shared fields were refused as 'already counted' (the technician could not
    count them). The same thin field after a small change is still the same view."""
    from device.camera import same_view, thumbnail
    from device.segment import segment_cells

    rng = np.random.default_rng(1)
    thin_views, changed = [], []
    for rgb in _fields_rgb():
        seg = segment_cells(rgb)
        bright = rgb.reshape(-1, 3)[rgb.reshape(-1, 3).sum(1) > np.percentile(rgb.sum(2), 80)]
        for _ in range(3):  # three thin fields from each picture, each of 10 of its cells
            out = np.clip(np.full(rgb.shape, np.median(bright, axis=0)) + rng.normal(0, 2, rgb.shape), 0, 255)
            out = out.astype(np.uint8)
            for i in rng.choice(len(seg.cells), size=10, replace=False):
                c = seg.cells[i]
                x, y, w, h = c.bbox
                # pale cells, as on the IML fields (these blue BBBC041 cells are darker than most)
                cell = 0.35 * rgb[y : y + h, x : x + w][c.mask] + 0.65 * out[y : y + h, x : x + w][c.mask]
                out[y : y + h, x : x + w][c.mask] = cell.astype(np.uint8)
            thin_views.append(thumbnail(np.ascontiguousarray(out[:900, :1200])))
            changed.append([thumbnail(np.ascontiguousarray(out[3:903, 3:1203])),  # the stage settled by 3 px
                            thumbnail(np.clip(out[:900, :1200].astype(np.float32) * 1.05, 0, 255).astype(np.uint8))])
    for v, again in zip(thin_views, changed, strict=True):
        assert all(same_view(v, a) for a in again)
    n = len(thin_views)
    assert not [(i, j) for i in range(n) for j in range(n) if i != j and same_view(thin_views[i], thin_views[j])]


def test_a_field_of_few_cells_captured_again_after_a_lamp_change_is_still_the_same_view():
    """The contrast rule alone let a limit fall under the thumbnails' own rounding: a field of a few cells,
    mostly plasma, captured again after a 15% lamp change and a 3 px drift counted again."""
    from device.camera import same_view, thumbnail
    from device.segment import segment_cells

    rgb = _fields_rgb()[0]
    seg = segment_cells(rgb)
    bright = rgb.reshape(-1, 3)[rgb.reshape(-1, 3).sum(1) > np.percentile(rgb.sum(2), 80)]
    rng = np.random.default_rng(2)
    recognised = []
    for trial in range(8):
        out = np.clip(np.full(rgb.shape, np.median(bright, axis=0)) + rng.normal(0, 2, rgb.shape), 0, 255)
        out = out.astype(np.uint8)
        for i in rng.choice(len(seg.cells), size=4, replace=False):  # four pale cells on plasma
            c = seg.cells[i]
            x, y, w, h = c.bbox
            cell = 0.35 * rgb[y : y + h, x : x + w][c.mask] + 0.65 * out[y : y + h, x : x + w][c.mask]
            out[y : y + h, x : x + w][c.mask] = cell.astype(np.uint8)
        first = thumbnail(np.ascontiguousarray(out[:900, :1200]))
        lamp = 1.1 + 0.05 * (trial % 3)
        again = np.clip(out[:900, 3:1203].astype(np.float32) * lamp + rng.normal(0, 2, (900, 1200, 3)), 0, 255)
        recognised.append(same_view(first, thumbnail(again.astype(np.uint8))))
    assert all(recognised), recognised


def test_a_slow_camera_has_stalled_after_five_of_its_frame_intervals(monkeypatch):
    """A 1 frame/s camera (a replay, a slow USB camera) that stops sending is stalled after 5 s, not after the
    3 s floor, nor only after 50 s (a frozen picture read as "connected, steady" and Capture stored it)."""
    from device.camera import Frame

    clock = [1000.0]
    monkeypatch.setattr(cam_mod.time, "monotonic", lambda: clock[0])
    feed = CameraFeed(lambda: None, focus=lambda rgb: 3.0)
    feed._state, feed._fps, feed._interval_hint = "connected", 1.0, 1.0
    feed._frame = Frame(1, _fields_rgb()[0], clock[0], 3.0)
    clock[0] += 4.0  # under five intervals: a slow camera, not a stalled one
    assert feed.stalled_s() is None
    clock[0] += 2.0
    assert feed.stalled_s() == pytest.approx(6.0)


def test_frames_differing_by_more_than_sensor_noise_are_not_steady():
    """The stage is still when frames differ by sensor noise (mean 2.2 gray levels here), not when they differ
    by more than 3 (4.2 here: a stage still moving, a hand on the microscope)."""
    from device.camera import STEADY_MAX_DIFF, frames_alike, thumbnail

    a = thumbnail(np.ascontiguousarray(_fields_rgb()[0][:900, :1200]))
    rng = np.random.default_rng(0)

    def noisy(amp):
        return np.clip(a.astype(int) + rng.integers(-amp, amp + 1, a.shape), 0, 255).astype(np.uint8)

    calm, shaken = noisy(4), noisy(8)
    assert cv2.absdiff(a, calm).mean() < STEADY_MAX_DIFF < cv2.absdiff(a, shaken).mean() < 1.5 * STEADY_MAX_DIFF
    assert frames_alike(a, calm) and not frames_alike(a, shaken)


def test_the_retry_back_off_starts_again_once_frames_came(monkeypatch):
    """After a long outage the waits between retries had grown; frames coming again reset them, so a later
    brief loss is retried after the shortest wait, not the longest reached before."""
    opens, waits = [0], []
    frame = _fields_rgb()[0][:480, :640]

    class Cam:
        def __init__(self):
            self.reads = 0

        def read(self):
            self.reads += 1
            if self.reads == 5:
                raise CameraError("unplugged")
            time.sleep(0.01)
            return frame

        def close(self):
            pass

    def opener():
        opens[0] += 1
        if opens[0] <= 4:
            raise CameraError("not there yet")
        return Cam()

    feed = CameraFeed(opener, reconnect_min_s=0.01, reconnect_max_s=1.0, focus=lambda rgb: 3.0)
    real_wait = feed._wait
    monkeypatch.setattr(feed, "_wait", lambda s: (waits.append(s), real_wait(min(s, 0.01)))[1])
    feed.start()
    try:
        assert wait_until(lambda: len(waits) >= 5, timeout_s=20)
    finally:
        feed.stop()
    assert waits[:4] == pytest.approx([0.01, 0.02, 0.04, 0.08])  # the camera not there: each wait doubles
    assert waits[4] == pytest.approx(0.01)  # lost after 4 frames: the shortest wait again


def test_thumbnails_and_turned_views_of_a_strip_stay_small():
    """A 16 x 100,000 px upload (a 5 kB PNG) made a 160 x 1,000,000 thumbnail, and its four turns 640 MB."""
    from device.camera import MAX_THUMBNAIL_ASPECT, STEADY_WIDTH_PX, thumbnail, turned_views

    strip = np.zeros((100_000, 16, 3), np.uint8)
    assert thumbnail(strip).shape == (MAX_THUMBNAIL_ASPECT * STEADY_WIDTH_PX, STEADY_WIDTH_PX)
    looks = turned_views(strip)
    assert looks and sum(v.nbytes for v in looks) < 2_000_000
    assert all(v.shape[0] <= 4 * STEADY_WIDTH_PX for v in looks)  # its turns on end are not compared
    field = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    assert len(turned_views(field)) == 7 and {v.shape for v in turned_views(field)} == {(120, 160), (213, 160)}
