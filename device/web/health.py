"""Device health for the admin page: temperature, load, memory, uptime, the clock, and the last problems
logged.

Each probe reads what Linux exposes (``/sys/class/thermal``, ``/proc``) and returns None where the
board or the OS does not expose it; the page then says "not available". Nothing here raises.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

THERMAL_DIR = Path("/sys/class/thermal")
PROC_DIR = Path("/proc")
RECENT_LOG_CAPACITY = 50  # WARNING+ records kept for the admin page; older ones are in the journal
# Thermal zones that measure the SoC: the Pi's is "cpu-thermal"; x86 boards say "x86_pkg_temp" or "acpitz".
CPU_ZONE_TYPES = ("cpu", "soc", "x86_pkg", "acpitz")
# How far the clock may lie behind a time it has already written before it is called wrong (a network
# time correction moves it by seconds, a Pi that was off without network by hours or days).
CLOCK_SLACK = timedelta(minutes=10)


def wall_clock() -> datetime:
    """Now, with its time zone (one place, so tests can set the device clock)."""
    return datetime.now(UTC)


def local_text(t: datetime) -> str:
    """A time as the pages show it: in the device's time zone, to the minute."""
    return t.astimezone().strftime("%Y-%m-%d %H:%M")


def clock_behind(now: datetime, t: datetime | None) -> bool:
    """The clock reads earlier than ``t`` (a time it has been at) by more than :data:`CLOCK_SLACK`."""
    return t is not None and now < t - CLOCK_SLACK


def clock_problem(now: datetime, newest_record: datetime | None, model_made: datetime | None) -> str | None:
    """Why the device clock looks wrong, or None.

    A Raspberry Pi has no battery-backed clock: without network time it starts from the time saved at
    the last shutdown (or from 1970), so after a night switched off it runs hours behind and every slide
    and report is misdated. The clock cannot be earlier than the newest time the records hold, nor than
    the date the running model was made. A clock that runs ahead cannot be told from here; once it is
    corrected, the records it dated are ahead of it, which an admin confirms (Store.confirm_clock).
    """
    if clock_behind(now, newest_record):
        return (f"the device clock reads {local_text(now)}, earlier than its newest record "
                f"({local_text(newest_record)})")
    if clock_behind(now, model_made):
        return (f"the device clock reads {local_text(now)}, earlier than the date its model was made "
                f"({local_text(model_made)})")
    return None


def cpu_temperature_c(thermal_dir: Path | None = None) -> float | None:
    """The CPU temperature in °C from ``thermal_zone*/temp`` (millidegrees), or None if not exposed.

    A zone whose ``type`` names the CPU/SoC is preferred; otherwise the first readable zone.
    """
    readings: list[tuple[bool, str, float]] = []
    for zone in sorted((thermal_dir or THERMAL_DIR).glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            kind = ""
        readings.append((not any(t in kind for t in CPU_ZONE_TYPES), zone.name, milli / 1000.0))
    if not readings:
        return None
    return min(readings)[2]


def memory_mb(proc_dir: Path | None = None) -> tuple[float, float] | None:
    """(available, total) memory in MB from ``/proc/meminfo``, or None."""
    values = {}
    try:
        for line in ((proc_dir or PROC_DIR) / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    if len(values) < 2:
        return None
    return values["MemAvailable"], values["MemTotal"]


def uptime_s(proc_dir: Path | None = None) -> float | None:
    """Seconds since the board booted, or None."""
    try:
        return float(((proc_dir or PROC_DIR) / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "not available"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, _ = divmod(s, 60)
    return f"{d} d {h} h {m} min" if d else f"{h} h {m} min"


# --- the last problems ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LogEntry:
    time: str
    level: str
    logger: str
    message: str


class RecentLog(logging.Handler):
    """A ring buffer of the last WARNING+ records, for the admin page ("last problems").

    A record logged with ``extra={"not_a_problem": True}`` (the first-run setup code) is left out.
    """

    def __init__(self, capacity: int = RECENT_LOG_CAPACITY, level: int = logging.WARNING):
        super().__init__(level)
        self._entries: deque[LogEntry] = deque(maxlen=capacity)
        self._lock_entries = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "not_a_problem", False):
            return
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                message += f" ({type(exc).__name__}: {exc})"
            entry = LogEntry(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)), record.levelname,
                             record.name, message)
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)
            return
        with self._lock_entries:
            self._entries.append(entry)

    def entries(self) -> list[LogEntry]:
        """Newest first."""
        with self._lock_entries:
            return list(reversed(self._entries))


_recent: RecentLog | None = None
_recent_lock = threading.Lock()


def install_recent_log() -> RecentLog:
    """The process's one :class:`RecentLog`, attached to the root logger on first call."""
    global _recent
    with _recent_lock:
        if _recent is None:
            _recent = RecentLog()
            logging.getLogger().addHandler(_recent)
        return _recent
