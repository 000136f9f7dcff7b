"""The device configuration: one TOML file, validated once, as a frozen object.

Every key is documented in ``systemd/config.toml`` (the installed config). Unknown keys, wrong types
and values out of range are errors that name the key (``camera.source: must be one of ...``).
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RBC_PER_UL_RANGE = (1e6, 1e7)  # a measured or assumed red-cell count per uL (config, CLI, start form)
OLD_FOCUS_SCALE_ABOVE = 10.0  # min_focus above this was written for the old focus measure
SHARP_FOCUS_ABOVE = 4.2  # sharp fields measure 2.49-4.22: a min_focus above this rejects nearly all

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
DEFAULT_MODEL_PATH = PROJECT_DIR / "models" / "cellnet_int8.tflite"
DEFAULT_SAMPLES_DIR = PACKAGE_DIR / "samples"

# The operating threshold may be changed by an admin only within this range: below it the
# false-positive rate per healthy cell makes negative slides read positive; above it sensitivity
# collapses. The model card's own threshold is the default.
THRESHOLD_SAFE_RANGE = (0.5, 0.999)
# Cells near the threshold shown for review: from at least 0.5 (below it, mostly healthy cells: with the
# shipped model 192 per 1,000 of the blue BBBC041 cells score from 0.5 up to its threshold) up to 1
# (none). The records index those cells from 0.5 (device.store, migration 10): a lower bound needs a new
# index there.
REVIEW_FLOOR_RANGE = (0.5, 1.0)


def review_floor_at(review_floor: float, threshold: float) -> float | None:
    """The floor from which cells are shown near the threshold at this operating threshold, or None when
    none are: a floor of 1, or a threshold at or below the floor (an admin may set one from 0.5)."""
    return review_floor if review_floor < min(1.0, threshold) else None


class ConfigError(ValueError):
    """A configuration problem, naming the key: ``section.key: problem``."""


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "data"
    log_level: str = "INFO"
    save_raw_frames: bool = True
    min_free_disk_mb: int = 500


@dataclass(frozen=True)
class CameraConfig:
    source: str = "replay"  # replay | opencv | picamera2
    replay_path: str = str(DEFAULT_SAMPLES_DIR)
    replay_fps: float = 2.0
    # Each pass over a replay folder shows its pictures turned the next of 8 ways (mirrored, rotated):
    # distinct views, so the demo's 4 sample fields make 32 before "already counted". Off for recorded
    # fields (their turned copies would count the same cells again); on in the embedded demo config.
    replay_turns: bool = False
    # Each picture of a replay folder is shown this long (seconds, its frames repeated) before the next, as a
    # microscope shows a field until the stage moves: the page's auto-capture takes a view held steady for
    # 1 s, so 0 (the next picture on every frame) gives it nothing to take. 4 in the embedded demo config.
    replay_hold_s: float = 0.0
    device: str = "0"  # OpenCV: index ("0") or path ("/dev/video0")
    width: int = 1280
    height: int = 960
    reconnect_max_s: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    path: str = str(DEFAULT_MODEL_PATH)
    threshold: float | None = None  # None: the model card's threshold
    threads: int = 1


@dataclass(frozen=True)
class AnalysisConfig:
    counting_target_rbc: int = 2000
    rbc_per_ul: float = 5.0e6
    min_focus: float = 2.4  # device.analysis.focus_measure's sharpness ratio; sharp fields measured 2.49-4.22
    min_cells_per_field: int = 10
    # Cells scored from this up to the threshold are shown for review "near the threshold" (1.0: none).
    # On the 20 held-out IML P. vivax fields, with the shipped model, 0.7 shows 10.8 cells per 1,000 and
    # holds 2 of the 4 parasite cells the threshold missed, the other 2 not segmented (recall 0.86 -> 0.93
    # once a person confirms them); 0.5: 18.1 per 1,000, the same 2 (README, "Cells near the threshold").
    review_floor: float = 0.7


@dataclass(frozen=True)
class SecurityConfig:
    admin_password_hash: str = ""  # werkzeug hash; empty: set on first run at /admin/setup
    technician_pin: str = ""  # empty: technician pages open on the LAN
    login_attempts_per_minute: int = 5


@dataclass(frozen=True)
class Config:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def with_changes(self, section: str, **changes: Any) -> Config:
        """A copy with some keys of one section changed, validated like a loaded file."""
        data = {s.name: {f.name: getattr(getattr(self, s.name), f.name) for f in fields(getattr(self, s.name))}
                for s in fields(self)}
        data[section].update(changes)
        return from_dict(data)


_CLASSES = {
    "service": ServiceConfig,
    "camera": CameraConfig,
    "model": ModelConfig,
    "analysis": AnalysisConfig,
    "security": SecurityConfig,
}


def _check_type(key: str, value: Any, default: Any, annotation: str) -> Any:
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if value is None and "None" in annotation:
                return None
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every range check (nan < x is false) and disables it
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation == "str":
        if isinstance(value, int) and not isinstance(value, bool) and key == "camera.device":
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _validate(cfg: Config) -> None:
    s, c, m, a, sec = cfg.service, cfg.camera, cfg.model, cfg.analysis, cfg.security
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"service.port: {s.port} is not a TCP port (1-65535)")
    if not s.host:
        raise ConfigError("service.host: must name an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
    if s.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"service.log_level: {s.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    if s.min_free_disk_mb < 0:
        raise ConfigError("service.min_free_disk_mb: must be >= 0")
    if c.source not in {"replay", "opencv", "picamera2"}:
        raise ConfigError(f"camera.source: {c.source!r} must be one of replay, opencv, picamera2")
    if c.source == "replay" and not c.replay_path:
        raise ConfigError("camera.replay_path: required when camera.source is replay")
    index = c.device.isascii() and c.device.isdigit()  # isdigit alone passes other scripts' digits
    if not (index or c.device.startswith("/")) or len(c.device) > 255 or not c.device.isprintable():
        # handed to cv2.VideoCapture as it is: a relative name or URL would open something else than a camera
        raise ConfigError(f"camera.device: {c.device[:80]!r} is not a camera index (0, 1, ...) or an absolute "
                          "device path such as /dev/video0")
    if not 0.1 <= c.replay_fps <= 60:
        raise ConfigError(f"camera.replay_fps: {c.replay_fps} outside 0.1-60")
    if not 0 <= c.replay_hold_s <= 600:
        raise ConfigError(f"camera.replay_hold_s: {c.replay_hold_s:g} outside 0-600 s")
    if not (64 <= c.width <= 8192 and 64 <= c.height <= 8192):
        raise ConfigError(f"camera.width/height: {c.width}x{c.height} outside 64-8192")
    if not 1 <= c.reconnect_max_s <= 600:
        raise ConfigError(f"camera.reconnect_max_s: {c.reconnect_max_s:g} outside 1-600 s")
    lo, hi = THRESHOLD_SAFE_RANGE
    if m.threshold is not None and not lo <= m.threshold <= hi:
        raise ConfigError(f"model.threshold: {m.threshold} outside the safe range {lo}-{hi}")
    if not 1 <= m.threads <= 8:
        raise ConfigError(f"model.threads: {m.threads} outside 1-8")
    if not m.path.strip():
        raise ConfigError("model.path: required")
    if not s.data_dir.strip():  # "" resolved to whatever folder the service was started in
        raise ConfigError("service.data_dir: required (the folder for the records and images)")
    if not 100 <= a.counting_target_rbc <= 100_000:
        raise ConfigError(f"analysis.counting_target_rbc: {a.counting_target_rbc} outside 100-100000")
    if not RBC_PER_UL_RANGE[0] <= a.rbc_per_ul <= RBC_PER_UL_RANGE[1]:
        raise ConfigError(f"analysis.rbc_per_ul: {a.rbc_per_ul:g} outside 1e6-1e7 RBC/uL")
    if not 0 <= a.min_focus <= OLD_FOCUS_SCALE_ABOVE:  # a sharpness ratio: sharp fields 2.49-4.22, no detail 1
        raise ConfigError(f"analysis.min_focus: {a.min_focus:g} outside 0-10 (the sharpness ratio; sharp fields "
                          "measure 2.5-4.2, the default is 2.4)")
    if a.min_cells_per_field < 1:
        raise ConfigError("analysis.min_cells_per_field: must be >= 1")
    if not REVIEW_FLOOR_RANGE[0] <= a.review_floor <= REVIEW_FLOOR_RANGE[1]:
        raise ConfigError(f"analysis.review_floor: {a.review_floor:g} outside {REVIEW_FLOOR_RANGE[0]:g}-"
                          f"{REVIEW_FLOOR_RANGE[1]:g} (1 shows no cells near the threshold)")
    pin = sec.technician_pin
    if pin and not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 12):
        raise ConfigError("security.technician_pin: must be 4-12 digits, or empty for no PIN")
    if sec.admin_password_hash and ":" not in sec.admin_password_hash:
        raise ConfigError("security.admin_password_hash: not a password hash (make one with "
                          "`python -m device hash-password`)")
    if not 1 <= sec.login_attempts_per_minute <= 100:
        raise ConfigError("security.login_attempts_per_minute: outside 1-100")


def from_dict(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from parsed TOML. Relative paths resolve from base_dir."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a table of sections")
    for name in data:
        if name not in _CLASSES:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(_CLASSES)})")
    sections = {}
    for name, cls in _CLASSES.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: expected a [{name}] table")
        known = {f.name: f for f in fields(cls)}
        defaults = cls()
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(known)})")
            values[key] = _check_type(f"{name}.{key}", value, getattr(defaults, key), str(known[key].type))
        old_focus = values.get("min_focus") if name == "analysis" else None
        if isinstance(old_focus, int | float) and old_focus > OLD_FOCUS_SCALE_ABOVE:
            # Up to 2026-11 min_focus was a Laplacian variance (default 40): a config kept across an
            # upgrade would otherwise stop the service (out of range) or reject every field.
            logger.warning("analysis.min_focus %g is on the old focus scale (the variance of the Laplacian); "
                           "using the new default %g: set analysis.min_focus = %g in the config",
                           values["min_focus"], defaults.min_focus, defaults.min_focus)
            values["min_focus"] = defaults.min_focus
        elif isinstance(old_focus, int | float) and old_focus > SHARP_FOCUS_ABOVE:
            logger.warning("analysis.min_focus %g is above what sharp fields measure (2.5-4.2): every field may "
                           "be rejected as out of focus (the default is %g)", old_focus, defaults.min_focus)
        section = replace(defaults, **values)
        if base_dir is not None:
            section = _resolve_paths(name, section, base_dir)
        sections[name] = section
    cfg = Config(**sections)
    _validate(cfg)
    return cfg


def _resolve_paths(name: str, section: Any, base_dir: Path) -> Any:
    keys = {"service": ["data_dir"], "camera": ["replay_path"], "model": ["path"]}.get(name, [])
    changes = {}
    for k in keys:
        v = getattr(section, k)
        if v and not Path(v).is_absolute():
            changes[k] = str((base_dir / v).resolve())
    return replace(section, **changes) if changes else section


def read_utf8(path: Path, what: str, *, missing_ok: bool = False) -> str | None:
    """The text of a settings file (None when it is missing and ``missing_ok``). Raises ConfigError
    naming the file when it cannot be read or is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        if missing_ok and isinstance(exc, FileNotFoundError):
            return None
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from exc


# The demo holds each sample field 4 s: the page's auto-capture (steady for 1 s, sharp) takes each once, and a
# technician has time to press Capture on it.
DEMO_REPLAY_HOLD_S = 4.0


def load_config(path: str | Path | None) -> Config:
    """Load a TOML config file (None: the embedded defaults). Raises :class:`ConfigError`."""
    if path is None:  # the demo: the bundled sample fields, turned on each pass to give more fields
        return from_dict({"camera": {"replay_turns": True, "replay_hold_s": DEMO_REPLAY_HOLD_S}})
    p = Path(path)
    text = read_utf8(p, "config") or ""  # never None here: a missing config is an error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    return from_dict(data, base_dir=p.resolve().parent)
