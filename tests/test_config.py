"""The config object: defaults, validation naming the key, and the check-config command."""

import subprocess
import sys
from pathlib import Path

import pytest

from device.config import ConfigError, from_dict, load_config
from tests.conftest import MODEL_PATH

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_defaults_are_the_demo():
    cfg = load_config(None)
    assert cfg.camera.source == "replay" and Path(cfg.camera.replay_path).is_dir()
    assert Path(cfg.model.path).is_file()
    assert cfg.service.host == "127.0.0.1" and cfg.service.port == 8080
    assert cfg.analysis.counting_target_rbc == 2000


@pytest.mark.parametrize(("data", "message"), [
    ({"camera": {"source": "webcam"}}, "camera.source"),
    ({"camera": {"sorce": "replay"}}, "camera.sorce: unknown key"),
    ({"cam": {}}, "cam: unknown section"),
    ({"service": {"port": 70000}}, "service.port"),
    ({"service": {"port": "8080"}}, "service.port: expected a whole number"),
    ({"model": {"threshold": 0.2}}, "model.threshold"),
    ({"analysis": {"counting_target_rbc": 10}}, "analysis.counting_target_rbc"),
    ({"security": {"technician_pin": "12ab"}}, "security.technician_pin"),
    # digits of other scripts pass str.isdigit: the PIN check then failed on every attempt (TypeError)
    ({"security": {"technician_pin": "\u0661\u0662\u0663\u0664"}}, "security.technician_pin"),
    ({"camera": {"device": "\u00b2"}}, "camera.device"),
    ({"service": {"data_dir": ""}}, "service.data_dir: required"),  # was the working directory
    ({"model": {"path": "  "}}, "model.path: required"),
    ({"security": {"admin_password_hash": "hunter2"}}, "security.admin_password_hash"),
    ({"service": {"save_raw_frames": "yes"}}, "service.save_raw_frames: expected true or false"),
    # nan passes `< 0`-style checks: it switched the focus gate off and un-capped the camera back-off
    ({"analysis": {"min_focus": float("nan")}}, "analysis.min_focus: expected a finite number"),
    ({"camera": {"reconnect_max_s": float("inf")}}, "camera.reconnect_max_s: expected a finite number"),
    ({"camera": {"reconnect_max_s": 1e-9}}, "camera.reconnect_max_s: 1e-09 outside 1-600 s"),
    ({"analysis": {"min_focus": -1}}, "analysis.min_focus: -1 outside 0-10"),
    ({"analysis": {"review_floor": 0.3}}, "analysis.review_floor: 0.3 outside 0.5-1"),
    ({"analysis": {"review_floor": float("nan")}}, "analysis.review_floor: expected a finite number"),
    ({"analysis": {"review_floor": "0.7"}}, "analysis.review_floor"),
    ({"camera": {"device": "video0"}}, "camera.device: 'video0' is not a camera index"),
    ({"camera": {"device": "http://10.0.0.9/stream"}}, "camera.device: 'http://10.0.0.9/stream' is not"),
    ({"camera": {"device": "/dev/video0\n"}}, "camera.device"),
    # just past each edge (a mutation audit: none of these was tried)
    ({"service": {"port": 0}}, "service.port: 0 is not a TCP port"),
    ({"service": {"port": True}}, "service.port: expected a whole number, got True"),
    ({"service": {"log_level": "VERBOSE"}}, "service.log_level: 'VERBOSE' is not"),
    ({"service": {"min_free_disk_mb": -1}}, "service.min_free_disk_mb: must be >= 0"),
    ({"camera": {"source": "replay", "replay_path": ""}}, "camera.replay_path: required"),
    ({"camera": {"replay_fps": 0.05}}, "camera.replay_fps: 0.05 outside 0.1-60"),
    ({"camera": {"replay_fps": 61}}, "camera.replay_fps: 61.0 outside 0.1-60"),
    ({"camera": {"replay_hold_s": -0.5}}, "camera.replay_hold_s: -0.5 outside 0-600 s"),
    ({"camera": {"replay_hold_s": 601}}, "camera.replay_hold_s: 601 outside 0-600 s"),
    ({"camera": {"replay_hold_s": float("nan")}}, "camera.replay_hold_s: expected a finite number"),
    ({"camera": {"height": 32}}, "camera.width/height"),
    ({"camera": {"width": 9000}}, "camera.width/height"),
    ({"model": {"threads": 9}}, "model.threads: 9 outside 1-8"),
    ({"model": {"threads": 0}}, "model.threads: 0 outside 1-8"),
    ({"model": {"threshold": 0.9995}}, "model.threshold"),
    ({"analysis": {"counting_target_rbc": 100_001}}, "analysis.counting_target_rbc: 100001 outside"),
    ({"analysis": {"rbc_per_ul": 5e5}}, "analysis.rbc_per_ul: 500000 outside 1e6-1e7"),
    ({"analysis": {"rbc_per_ul": 2e7}}, r"analysis.rbc_per_ul: 2e\+07 outside 1e6-1e7"),
    ({"analysis": {"min_focus": True}}, "analysis.min_focus: expected a number, got True"),
    ({"analysis": {"min_cells_per_field": 0}}, "analysis.min_cells_per_field: must be >= 1"),
    ({"security": {"technician_pin": "123"}}, "security.technician_pin: must be 4-12 digits"),
    ({"security": {"technician_pin": "1234567890123"}}, "security.technician_pin: must be 4-12 digits"),
    ({"security": {"login_attempts_per_minute": 0}}, "security.login_attempts_per_minute: outside 1-100"),
    ({"security": {"login_attempts_per_minute": 101}}, "security.login_attempts_per_minute: outside 1-100"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(data)


@pytest.mark.parametrize("data", [
    {"service": {"port": 1}}, {"service": {"port": 65535}}, {"camera": {"replay_fps": 0.1}},
    {"camera": {"replay_fps": 60}}, {"camera": {"width": 64, "height": 8192}}, {"model": {"threshold": 0.5}},
    {"camera": {"replay_hold_s": 0}}, {"camera": {"replay_hold_s": 600}},
    {"model": {"threshold": 0.999}}, {"model": {"threads": 8}}, {"analysis": {"counting_target_rbc": 100}},
    {"analysis": {"counting_target_rbc": 100_000}}, {"analysis": {"rbc_per_ul": 1e6}},
    {"analysis": {"rbc_per_ul": 1e7}}, {"analysis": {"review_floor": 0.5}}, {"analysis": {"review_floor": 1}},
    {"analysis": {"min_cells_per_field": 1}}, {"security": {"technician_pin": "1234"}},
    {"security": {"technician_pin": "123456789012"}}, {"security": {"login_attempts_per_minute": 1}},
    {"security": {"login_attempts_per_minute": 100}}, {"service": {"min_free_disk_mb": 0}},
], ids=lambda d: ".".join(f"{s}.{k}={v}" for s, kv in d.items() for k, v in kv.items()))
def test_values_at_the_edges_of_their_ranges_are_accepted(data):
    cfg = from_dict(data)
    for section, values in data.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value


def test_the_review_floor_applies_only_below_the_threshold():
    from device.config import review_floor_at

    assert review_floor_at(0.7, 0.979) == 0.7
    assert review_floor_at(0.9, 0.9) is None  # no cell lies from the floor up and under the threshold
    assert review_floor_at(0.95, 0.9) is None and review_floor_at(1.0, 0.999) is None


def test_relative_paths_resolve_from_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('[service]\ndata_dir = "state"\n[camera]\ndevice = 2\n')
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.service.data_dir == str(tmp_path / "state")
    assert cfg.camera.device == "2"


def test_with_changes_validates():
    cfg = load_config(None)
    assert cfg.with_changes("analysis", counting_target_rbc=1000).analysis.counting_target_rbc == 1000
    with pytest.raises(ConfigError, match="model.threshold"):
        cfg.with_changes("model", threshold=1.5)


def test_check_config_command(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[camera]\nsource = "webcam"\n')
    r = subprocess.run([sys.executable, "-m", "device", "check-config", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "camera.source" in r.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[camera\n")
    r = subprocess.run([sys.executable, "-m", "device", "check-config", str(broken)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text('[analysis]\ncounting_target_rbc = 1000\n')
    r = subprocess.run([sys.executable, "-m", "device", "check-config", str(good)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout and "sha256" in r.stdout
    # a config whose model the service could not use: it started, said ready and refused every capture
    import shutil

    model = tmp_path / "cellnet_int8.tflite"
    shutil.copy(MODEL_PATH, model)
    shutil.copy(MODEL_PATH.with_suffix(".json"), model.with_suffix(".json"))
    with open(model, "ab") as f:
        f.write(b"\0")  # not the model its card describes
    for case, path in (("changed", model), ("missing", tmp_path / "none.tflite")):
        cfg = tmp_path / f"{case}.toml"
        cfg.write_text(f'[model]\npath = "{path}"\n')
        r = subprocess.run([sys.executable, "-m", "device", "check-config", str(cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3 and r.stderr.startswith("model error:"), (case, r.stderr)
    # the file its card names, but a card whose output quantisation is not the file's: the card alone read
    # fine, the service built the interpreter and refused every capture
    import json

    other = tmp_path / "other" / "cellnet_int8.tflite"
    other.parent.mkdir()
    shutil.copy(MODEL_PATH, other)
    card = json.loads(MODEL_PATH.with_suffix(".json").read_text())
    card["output"]["quantization"] = {"scale": 0.2, "zero_point": 90}
    other.with_suffix(".json").write_text(json.dumps(card))
    cfg = tmp_path / "contradicted.toml"
    cfg.write_text(f'[model]\npath = "{other}"\n')
    r = subprocess.run([sys.executable, "-m", "device", "check-config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    error = [line for line in r.stderr.splitlines() if line.startswith("model error:")]  # after the runtime's INFO
    assert r.returncode == 3 and len(error) == 1 and "output" in error[0], r.stderr


def test_nan_in_a_toml_file_and_a_non_utf8_file_are_config_errors(tmp_path):
    from device.service import AdminSettings

    nan = tmp_path / "nan.toml"
    nan.write_text("[analysis]\nmin_focus = nan\n")  # TOML has a nan literal
    with pytest.raises(ConfigError, match="analysis.min_focus: expected a finite number"):
        load_config(nan)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# caméra du labo\n[camera]\nsource = \"replay\"\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml: not UTF-8 text"):
        load_config(latin1)  # was an uncaught UnicodeDecodeError: a traceback and a systemd restart loop
    (tmp_path / "settings.json").write_bytes('{"analysis": {"note": "é"}}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="settings.json: not UTF-8 text"):
        AdminSettings(tmp_path).load()


def test_a_min_focus_on_the_old_scale_is_read_as_the_new_default_with_a_warning(caplog):
    """min_focus was a Laplacian variance (default 40) before 2026-11: a config kept across an upgrade
    made check-config fail (the installer stopped, the service down) or would reject every field."""
    from device.config import from_dict

    with caplog.at_level("WARNING"):
        cfg = from_dict({"analysis": {"min_focus": 40.0}})
    assert cfg.analysis.min_focus == 2.4
    assert "old focus scale" in caplog.text and "min_focus = 2.4" in caplog.text
    assert from_dict({"analysis": {"min_focus": 3.0}}).analysis.min_focus == 3.0  # the new scale is kept


def test_a_min_focus_above_what_sharp_fields_measure_is_warned_about(caplog):
    from device.config import from_dict

    with caplog.at_level("WARNING"):
        cfg = from_dict({"analysis": {"min_focus": 4.4}})  # e.g. an old, lowered Laplacian threshold
    assert cfg.analysis.min_focus == 4.4 and "every field may be rejected" in caplog.text


def test_check_config_says_when_it_cannot_read_the_saved_settings(tmp_path, monkeypatch, capsys):
    """Run by a member of the service's group, the admin's settings (0600, the service user's) cannot be
    read: the rest is checked, and it says what was not (it failed as "cannot read")."""
    import os

    from device import cli

    data = tmp_path / "data"
    data.mkdir()
    (data / "settings.json").write_text('{"analysis": {"counting_target_rbc": 1000}}')
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[service]\ndata_dir = "{data}"\n[model]\npath = "{MODEL_PATH}"\n')
    assert cli.main(["check-config", str(cfg)]) == 0
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("settings.json") else
                        real_access(p, mode))
    assert cli.main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "settings.json: not read" in out.err and "OK" in out.out
