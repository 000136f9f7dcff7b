"""The Raspberry Pi deployment in systemd/: the unit, the install script and the config example.

Needs ``systemd-analyze`` and ``shellcheck`` (Debian: ``make system-deps``). Where one is missing the
test skips, except under CI (``CI`` set), where a missing tool fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from device.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "malaria-detect.service"
INSTALL_SH = SYSTEMD_DIR / "install.sh"
CONFIG_EXAMPLE = SYSTEMD_DIR / "config.toml"
ARM64_CHECK = REPO / "tests" / "benchmarks" / "arm64_check.sh"

APP_DIR = "/opt/malaria-detect"
MAX_EXPOSURE = 3.0  # systemd-analyze security: 0 (locked down) to 10 (exposed)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed, and CI is set (install it with `make system-deps`)")
    pytest.skip(f"{name} is not installed (Debian: `make system-deps`)")


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """The unit's settings: section -> key -> values, in order (systemd allows repeated keys)."""
    settings: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = settings.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return settings


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kwargs)


# --- the unit ----------------------------------------------------------------------------------


def test_unit_verifies_without_any_output(tmp_path):
    analyze = require_tool("systemd-analyze")
    # verify checks that ExecStart's program exists and is executable: move the unit's paths into
    # a temporary tree that has a stub for the venv's python.
    root = tmp_path / "root"
    stub = root / APP_DIR.lstrip("/") / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "unit" / UNIT.name
    unit.parent.mkdir()
    unit.write_text(UNIT.read_text().replace(APP_DIR, str(root / APP_DIR.lstrip("/"))))

    res = run([analyze, "verify", str(unit)])

    output = res.stdout + res.stderr  # warnings exit 0 too: the output itself must be empty
    assert res.returncode == 0 and output == "", f"systemd-analyze verify said:\n{output}"


def test_unit_exposure_is_at_most_3(tmp_path):
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)

    res = run([analyze, "security", "--offline=true", "--no-pager", str(unit)])

    match = re.search(r"Overall exposure level for malaria-detect\.service: ([0-9.]+)", res.stdout)
    assert match, f"no exposure level in:\n{res.stdout}\n{res.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{res.stdout}"


def test_unit_runs_the_service_as_the_issue_asks():
    unit = unit_settings()
    service = unit["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert "WatchdogSec" in service
    assert service["Restart"] == ["on-failure"] and "RestartSec" in service
    assert "StartLimitIntervalSec" in unit["Unit"] and "StartLimitBurst" in unit["Unit"]
    assert service["User"] == ["malaria-detect"] and "video" in service["SupplementaryGroups"][0].split()
    assert service["ExecStart"] == [
        f"{APP_DIR}/.venv/bin/python -m device serve --config /etc/malaria-detect/config.toml"]
    assert service["WorkingDirectory"] == [APP_DIR]
    # The camera: a private /dev would hide it; the device cgroup lets the camera classes through.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in service["DeviceAllow"]}
    assert {"char-video4linux", "char-media", "char-dma_heap"} <= allowed
    # sd_notify needs AF_UNIX; the page needs IPv4/IPv6.
    families = set(" ".join(service["RestrictAddressFamilies"]).split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert service["CapabilityBoundingSet"] == [""]
    # OpenCV's warnings bypass logging: with a USB camera unplugged, one per retry in the journal
    env = dict(v.split("=", 1) for line in service["Environment"] for v in line.split())
    assert env["OPENCV_LOG_LEVEL"] == "ERROR" and env["PYTHONUNBUFFERED"] == "1"
    # No network dependency: the device must work without any network.
    text = UNIT.read_text()
    assert not re.search(r"^(After|Wants|Requires)=.*network", text, re.MULTILINE)
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_and_config_example_agree():
    service = unit_settings()["Service"]
    cfg = load_config(CONFIG_EXAMPLE)
    # The service writes only its StateDirectory: data_dir must be that directory.
    assert cfg.service.data_dir == "/var/lib/" + service["StateDirectory"][0]
    assert service["ExecStart"][0].endswith(
        "--config /etc/" + service["ConfigurationDirectory"][0] + "/config.toml")
    # No capabilities: a port below 1024 could not be bound.
    assert cfg.service.port >= 1024
    assert cfg.model.path.startswith(APP_DIR + "/models/")


# --- the config example ------------------------------------------------------------------------


def test_config_example_loads_with_pi_values():
    cfg = load_config(CONFIG_EXAMPLE)

    assert cfg.service.host == "0.0.0.0"  # the LAN reaches the page
    assert cfg.service.data_dir == "/var/lib/malaria-detect"
    assert cfg.camera.source == "picamera2"
    assert cfg.model.path == f"{APP_DIR}/models/cellnet_int8.tflite"
    assert (REPO / "models" / Path(cfg.model.path).name).is_file(), "the config names an unshipped model"


def test_config_example_documents_every_key():
    """Every key of device/config.py is in the example, set or commented out, under a comment."""
    lines = CONFIG_EXAMPLE.read_text().splitlines()
    assignment = re.compile(r"^#?\s*(\w+)\s*=")
    where: dict[tuple[str | None, str], int] = {}
    section = None
    for i, line in enumerate(lines):
        if m := re.match(r"^\[(\w+)\]\s*$", line):
            section = m.group(1)
        elif m := assignment.match(line):
            where.setdefault((section, m.group(1)), i)
    defaults = Config()
    for sec in fields(Config):
        for key in fields(getattr(defaults, sec.name)):
            name = f"{sec.name}.{key.name}"
            assert (sec.name, key.name) in where, f"{name} is missing from {CONFIG_EXAMPLE.name}"
            i = where[sec.name, key.name] - 1
            while i >= 0 and assignment.match(lines[i]):  # keys documented together (width, height)
                i -= 1
            assert i >= 0 and lines[i].startswith("#"), f"{name} has no comment above it"


# --- the install script ------------------------------------------------------------------------


@pytest.mark.parametrize("script", [INSTALL_SH, ARM64_CHECK], ids=["install.sh", "arm64_check.sh"])
def test_the_pi_scripts_pass_shellcheck(script):
    shellcheck = require_tool("shellcheck")
    res = run([shellcheck, str(script)])
    assert res.returncode == 0, res.stdout + res.stderr


# A stand-in for the emulated Pi's Python: this machine's, its report then changed as MODE says.
ARM_PYTHON_STAND_IN = """#!/bin/sh
"{py}" "$@" || exit $?
exec "{py}" - "$@" <<'PY'
import json, os, sys
path = sys.argv[sys.argv.index("--json") + 1]
report = json.load(open(path))
image = report["images"][0]
if os.environ["MODE"] == "last-bit":  # a number with a fraction one ulp off, as numpy's exp may give it
    image["cell_diameter_px"] *= 1 + 2 ** -52
elif os.environ["MODE"] == "count":  # one cell more
    image["n_detected"] += 1
json.dump(report, open(path, "w"))
PY
"""


@pytest.mark.parametrize("mode", ["last-bit", "count"])
def test_the_pi_check_compares_reports_cell_for_cell_and_numbers_to_their_last_bits(tmp_path, mode):
    """`arm64_check.sh evaluate` (run on this machine with a stand-in for the emulated Pi's Python): a field
    folder named relative to where it is called from, a cell size one ulp off (the same), one cell more
    (DIFFERENT, exit 1)."""
    import sys

    work = tmp_path / "work"
    work.mkdir()
    (work / "python").write_text(ARM_PYTHON_STAND_IN.format(py=sys.executable))
    (work / "python").chmod(0o755)
    env = {**os.environ, "WORKDIR": str(work), "HOST_PY": sys.executable, "MODE": mode}
    res = subprocess.run(["bash", str(ARM64_CHECK), "evaluate", "fields"], cwd=REPO / "tests" / "fixtures",
                         capture_output=True, text=True, env=env, timeout=300)
    report = json.loads((work / "fields-cortex-a72.json").read_text())
    assert report["images"][0]["n_detected"] > 0, "the fixture field has cells to compare"
    if mode == "last-bit":
        assert res.returncode == 0, res.stdout + res.stderr
        assert "the same" in res.stdout and "1 of " in res.stdout, res.stdout
    else:
        assert res.returncode == 1 and "DIFFERENT in 1 place " in res.stdout, res.stdout + res.stderr
        assert ".images[0].n_detected: " in res.stdout  # where


@pytest.fixture
def source(tmp_path) -> Path:
    """A copy of the project as a release folder would hold it, plus clutter install.sh must skip."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md", "Makefile"):
        shutil.copy(REPO / name, src / name)
    for name in ("device", "systemd", "train", "convert"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    models = src / "models"
    models.mkdir()
    (models / "cellnet_int8.tflite").write_bytes(b"TFL3 not a real model")
    (models / "cellnet_int8.json").write_text("{}\n")
    for clutter in (".venv/bin/python", ".git/HEAD", "data/malaria.db", "runs/smoke/model.keras",
                    "device/__pycache__/config.cpython-311.pyc", "tests/test_x.py"):
        (src / clutter).parent.mkdir(parents=True, exist_ok=True)
        (src / clutter).write_text("clutter\n")
    return src


def install(src: Path, *args: str) -> subprocess.CompletedProcess:
    res = run(["bash", str(src / "systemd" / "install.sh"), *args])
    assert res.returncode == 0, f"install.sh {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def test_install_dry_run_prints_the_actions_and_changes_nothing(source, tmp_path):
    root = tmp_path / "root"

    res = install(source, "--dry-run", "--root", str(root))

    assert not root.exists()
    out = res.stdout
    assert f"{root}/etc/systemd/system/malaria-detect.service" in out
    assert f"{root}/etc/malaria-detect/config.toml" in out
    assert f"{root}{APP_DIR}" in out
    assert "skip (--root): systemctl daemon-reload" in out
    assert "skip (--root): systemctl enable malaria-detect.service" in out
    assert "skip (--root): useradd" in out
    assert "pip install" not in out  # --root leaves the venv alone


def test_install_dry_run_on_the_pi_shows_venv_user_and_service(source):
    if run(["python3", "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 11))"]).returncode:
        pytest.skip("install.sh needs python3 to be 3.11, as on Raspberry Pi OS Bookworm")

    out = install(source, "--dry-run").stdout

    assert "+ useradd --system --user-group" in out or "user malaria-detect exists" in out
    assert "+ usermod --append --groups video malaria-detect" in out
    assert f"-m venv --system-site-packages {APP_DIR}/.venv" in out or f"reusing {APP_DIR}/.venv" in out
    # the device extra's packages from the folder being installed, not the project itself (rebuilding it
    # needed the index on every run), and before the service is stopped and the code replaced
    pip = re.search(r"-m pip install --disable-pip-version-check --no-input -c (\S+) (.*)", out)
    assert pip and pip.group(1) == f"{source}/constraints.txt" and "[device]" not in pip.group(2)
    assert "numpy>=1.24,<2" in pip.group(2) and "ai-edge-litert" in pip.group(2)
    lines = out.splitlines()
    first = {what: next((i for i, line in enumerate(lines) if what in line), None)
             for what in ("-m pip install", "systemctl stop", "| tar -C", "-m device check-config")}
    assert first["-m pip install"] < first["| tar -C"] < first["-m device check-config"], first
    assert first["systemctl stop"] is None or first["-m pip install"] < first["systemctl stop"], first
    assert "-m device check-config /etc/malaria-detect/config.toml" in out
    assert "+ systemctl enable malaria-detect.service" in out
    assert "+ systemctl restart malaria-detect.service" in out
    assert "nothing was changed" in out


def test_install_root_creates_unit_config_and_code(source, tmp_path):
    root = tmp_path / "root"

    install(source, "--root", str(root))

    unit = root / "etc/systemd/system/malaria-detect.service"
    assert unit.read_text() == UNIT.read_text()
    config = root / "etc/malaria-detect/config.toml"
    assert config.read_text() == CONFIG_EXAMPLE.read_text()
    assert config.stat().st_mode & 0o777 == 0o640  # it may hold the admin hash and the PIN
    assert (root / "etc/malaria-detect/config.toml.example").read_text() == CONFIG_EXAMPLE.read_text()
    app = root / APP_DIR.lstrip("/")
    for name in ("pyproject.toml", "constraints.txt", "device/__main__.py", "device/config.py",
                 "models/cellnet_int8.tflite", "models/cellnet_int8.json", "systemd/install.sh"):
        assert (app / name).is_file(), f"{name} was not copied"
    for name in (".venv", ".git", "data", "runs", "tests", "device/__pycache__"):
        assert not (app / name).exists(), f"{name} should not be copied"
    assert (app / "device/config.py").stat().st_mode & 0o777 == 0o644
    assert (app / "systemd/install.sh").stat().st_mode & 0o777 == 0o755
    assert not (root / "var/lib/malaria-detect").exists()  # systemd creates the StateDirectory


def test_reinstall_keeps_config_and_database_and_replaces_code(source, tmp_path):
    root = tmp_path / "root"
    install(source, "--root", str(root))
    config = root / "etc/malaria-detect/config.toml"
    config.write_text(config.read_text().replace('log_level = "INFO"', 'log_level = "DEBUG"'))
    state = root / "var/lib/malaria-detect"
    state.mkdir(parents=True)
    (state / "malaria.db").write_bytes(b"SQLite format 3\x00 patient results")
    app = root / APP_DIR.lstrip("/")
    (app / "device/removed_in_new_version.py").write_text("old\n")
    (app / ".venv/bin").mkdir(parents=True)
    (app / ".venv/bin/python").write_text("the installed venv\n")

    install(source, "--root", str(root))

    assert 'log_level = "DEBUG"' in config.read_text()
    assert (state / "malaria.db").read_bytes() == b"SQLite format 3\x00 patient results"
    assert not (app / "device/removed_in_new_version.py").exists()
    assert (app / ".venv/bin/python").read_text() == "the installed venv\n"
    assert (app / "device/config.py").is_file()


def test_a_copy_that_fails_leaves_the_installed_code_whole(source, tmp_path):
    """The update deleted the installed code, then copied the new one in: a copy cut short (a full card)
    left half of it, and the service restarted on that crash-looped. Now the copy is made beside it and
    swapped in by renames: a failed copy changes nothing."""
    root = tmp_path / "root"
    install(source, "--root", str(root))
    app = root / APP_DIR.lstrip("/")
    (app / "device/only_in_the_installed_version.py").write_text("installed\n")
    (app / ".venv/bin").mkdir(parents=True)
    (app / ".venv/bin/python").write_text("the installed venv\n")
    before = sorted(str(p.relative_to(app)) for p in app.rglob("*"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    real_tar = shutil.which("tar")
    # the extracting tar writes a little, then the card is full
    full = 'echo "tar: write error: No space left on device" >&2'
    (bindir / "tar").write_text(f'#!/bin/sh\ncase " $* " in *" -xf "*) {real_tar} "$@" >/dev/null 2>&1 & '
                                f'sleep 0.2; kill $! 2>/dev/null; {full}; exit 2;; esac\nexec {real_tar} "$@"\n')
    (bindir / "tar").chmod(0o755)
    res = subprocess.run(["bash", str(source / "systemd" / "install.sh"), "--root", str(root)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LC_ALL": "C.UTF-8", "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert res.returncode != 0 and "left as it was" in res.stderr, res.stderr
    assert sorted(str(p.relative_to(app)) for p in app.rglob("*")) == before
    assert (app / ".venv/bin/python").read_text() == "the installed venv\n"
    assert not (root / (APP_DIR.lstrip("/") + ".new")).exists() and not (root / (APP_DIR.lstrip("/") + ".old")).exists()


@pytest.mark.parametrize("cut_after", ["the old tree moved aside", "the venv moved into the new copy"])
def test_an_update_cut_short_between_the_renames_is_put_right_by_the_next_run(source, tmp_path, cut_after):
    """A failed rename or a Ctrl-C between copy_code's renames left no /opt/malaria-detect: the next run rebuilt
    the venv from the network (offline: failed) and deleted the old tree with its venv."""
    root = tmp_path / "root"
    install(source, "--root", str(root))
    app = root / APP_DIR.lstrip("/")
    (app / ".venv/bin").mkdir(parents=True)
    (app / ".venv/bin/python").write_text("the installed venv\n")
    old, new = Path(f"{app}.old"), Path(f"{app}.new")
    app.rename(old)  # the first rename
    if cut_after == "the venv moved into the new copy":
        shutil.copytree(source / "device", new / "device")
        (old / ".venv").rename(new / ".venv")
    out = install(source, "--root", str(root)).stdout
    assert "an earlier update stopped mid-swap" in out
    assert (app / ".venv/bin/python").read_text() == "the installed venv\n"
    assert (app / "device/config.py").is_file() and not old.exists() and not new.exists()


def test_a_release_folder_named_like_the_swap_folders_is_refused(source, tmp_path):
    """Unpacked as /opt/malaria-detect.new and installed from there, the release deleted itself (the stage)."""
    root = tmp_path / "root"
    for suffix in (".new", ".old"):
        release = root / (APP_DIR.lstrip("/") + suffix)
        release.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, release)
        res = run(["bash", str(release / "systemd" / "install.sh"), "--root", str(root)])
        assert res.returncode != 0 and "uses for the swap" in res.stderr, res.stderr
        assert (release / "device/config.py").is_file()  # untouched
        shutil.rmtree(release)


def test_uninstall_keeps_data_unless_purge(source, tmp_path):
    root = tmp_path / "root"
    install(source, "--root", str(root))
    state = root / "var/lib/malaria-detect"
    state.mkdir(parents=True)
    (state / "malaria.db").write_text("db")
    app = root / APP_DIR.lstrip("/")

    # Run from the installed copy, as an admin would: it removes its own folder.
    install(app, "--root", str(root), "--uninstall")

    assert not (root / "etc/systemd/system/malaria-detect.service").exists()
    assert not app.exists()
    assert (root / "etc/malaria-detect/config.toml").is_file()
    assert (state / "malaria.db").read_text() == "db"

    install(source, "--root", str(root), "--uninstall", "--purge")

    assert not (root / "etc/malaria-detect").exists()
    assert not state.exists()


def test_install_refuses_a_source_without_model(source, tmp_path):
    for f in (source / "models").iterdir():
        f.unlink()

    res = run(["bash", str(source / "systemd" / "install.sh"), "--root", str(tmp_path / "root")])

    assert res.returncode != 0
    assert "no model" in res.stderr
    assert not (tmp_path / "root").exists()


def test_install_rejects_unknown_options(source):
    res = run(["bash", str(source / "systemd" / "install.sh"), "--frobnicate"])
    assert res.returncode != 0 and "unknown option: --frobnicate" in res.stderr


def _install_functions(*names: str) -> str:
    """The named functions of install.sh, as written there."""
    script = INSTALL_SH.read_text()
    out = []
    for name in names:
        body = script[script.index(f"\n{name}() {{") + 1:]
        out.append(body[: body.index("\n}\n") + 3])
    return "".join(out)


@pytest.mark.parametrize("starts", [True, False])
def test_a_failed_update_starts_the_stopped_service_again(tmp_path, starts):
    """The update stopped the service, then a later step failed (pip without network, a config the new
    version refuses) or the update was interrupted (Ctrl-C, a dropped SSH session): the script exited and
    left the clinic's device down. Run here with install.sh's own stop_service and exit trap and a
    stand-in systemctl: the service is started again, and the exit status kept."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fake = bindir / "systemctl"
    # is-active: the service runs; stop: fine; start: as the parameter says
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase "$1" in start) exit {0 if starts else 1};; esac\n'
                    "exit 0\n")
    fake.chmod(0o755)
    functions = _install_functions("run", "quote", "stop_service", "restart_after_failure")
    prelude = f"set -euo pipefail\nAPP=malaria-detect; UNIT=malaria-detect.service; ROOT=; DRY_RUN=0\n{functions}\n"
    ends = {"success": ("true", 0), "a failed step": ("false", 1), "Ctrl-C": ("kill -INT $$; sleep 5", 130),
            "SIGTERM": ("kill -TERM $$; sleep 5", 143)}
    for what, (step, status) in ends.items():
        calls.write_text("")
        r = subprocess.run(["bash", "-c", f"{prelude}stop_service\n{step}\n"],
                           env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == status, (what, r.stderr)
        started = "start malaria-detect.service" in calls.read_text().splitlines()
        assert started == (what != "success"), (what, calls.read_text())
        if what != "success":
            assert ("is running again" if starts else "does not start") in r.stderr, what


@pytest.mark.parametrize("end", ["config refused", "config passes", "a step before the check fails",
                                 "Ctrl-C during the check"])
def test_an_update_whose_config_the_new_version_refuses_puts_the_installed_version_back(source, tmp_path, end):
    """check-config ran after the service was stopped, the new code swapped in and the old tree deleted: a
    config the new version refused left the new code crash-looping with nothing to go back to. Run here with
    install.sh's own copy_code, check_config and roll_back_code on a stand-in /opt, the real check-config of
    the copied code and the shipped model."""
    for name in ("cellnet_int8.tflite", "cellnet_int8.json"):
        shutil.copy(REPO / "models" / name, source / "models" / name)
    opt = tmp_path / "opt" / "malaria-detect"
    shutil.copytree(source, opt, ignore=shutil.ignore_patterns("systemd", "train", "convert", ".venv"))
    (opt / "device" / "only_in_the_installed_version.py").write_text("installed\n")
    (opt / ".venv" / "bin").mkdir(parents=True)
    python = opt / ".venv" / "bin" / "python"
    # Ctrl-C while check-config runs: the terminal's SIGINT reaches the script too
    interrupt = 'kill -INT "$SCRIPT_PID"\n' if end == "Ctrl-C during the check" else ""
    python.write_text(f'#!/bin/sh\n{interrupt}exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    etc = tmp_path / "etc"
    etc.mkdir()
    config_passes = end != "config refused"
    threshold = "" if config_passes else "threshold = 5\n"  # outside the safe range: refused
    (etc / "config.toml").write_text(f'[service]\ndata_dir = "{tmp_path / "data"}"\n'
                                     f'[model]\npath = "{opt}/models/cellnet_int8.tflite"\n{threshold}')
    bindir = tmp_path / "bin"  # systemctl: the service runs; record what it is started on
    bindir.mkdir()
    (bindir / "systemctl").write_text(f'#!/bin/sh\n[ "$1" = start ] && ls {opt}/device > {tmp_path}/started_on\n'
                                      "exit 0\n")
    (bindir / "systemctl").chmod(0o755)
    functions = _install_functions("run", "quote", "note", "die", "stop_service", "restart_after_failure",
                                   "recover_interrupted_swap", "copy_code", "roll_back_code", "check_config")
    prelude = (f"set -euo pipefail\nAPP=malaria-detect; UNIT=malaria-detect.service; ROOT=; DRY_RUN=0\n"
               f"SRC_DIR={source}; OPT_DIR={opt}; VENV={opt}/.venv; ETC_DIR={etc}\nexport SCRIPT_PID=$$\n"
               f"{functions}\n")
    between = "false\n" if end == "a step before the check fails" else ""  # e.g. compile_code
    r = subprocess.run(["bash", "-c", f"{prelude}stop_service\ncopy_code\n{between}check_config\n"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert not Path(f"{opt}.old").exists() and not Path(f"{opt}.new").exists()
    assert python.read_text().startswith("#!/bin/sh")  # the venv is where the service looks for it
    assert (opt / "device" / "config.py").is_file()
    started = tmp_path / "started_on"
    if end == "config passes":
        assert r.returncode == 0, r.stderr
        assert not (opt / "device" / "only_in_the_installed_version.py").exists()
        assert (opt / "systemd" / "install.sh").is_file()
        assert not started.exists()  # install_unit starts it, after this
        return
    assert r.returncode == {"config refused": 1, "a step before the check fails": 1,
                            "Ctrl-C during the check": 130}[end], r.stderr
    if end == "config refused":
        assert "model.threshold" in r.stderr and "installed version is put back" in r.stderr
    assert (opt / "device" / "only_in_the_installed_version.py").read_text() == "installed\n"
    assert not (opt / "systemd").exists()  # not the new tree
    assert "only_in_the_installed_version.py" in started.read_text().split()  # started again on the old one
