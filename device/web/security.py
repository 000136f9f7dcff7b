"""Security hooks of the page: session secret, CSRF, technician PIN, admin password, rate limits.

- The Flask session is signed with a key kept in the data folder (``secret_key``, mode 0600, made on
  first run), so sessions survive restarts and no secret lives in the config or the code.
- Every POST carries the session's CSRF token, in a hidden ``csrf_token`` field or an ``X-CSRF-Token``
  header; a missing or wrong token is a 400. Cookies are HttpOnly and SameSite=Lax.
- ``security.technician_pin``, when set, is asked once per session before any technician page.
- The admin password hash comes from ``security.admin_password_hash`` or, when that is empty, from
  ``admin_password_hash`` in the data folder, written by the first-run setup at ``/admin/setup``.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_KEY_FILE = "secret_key"
ADMIN_HASH_FILE = "admin_password_hash"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
MIN_PASSWORD_LEN = 8


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (fails if it exists), contents synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o): set to 0600", path, mode)
        path.chmod(0o600)


def load_or_create_secret_key(data_dir: Path) -> bytes:
    """The session-signing key from ``data_dir/secret_key``, created (0600) on first run."""
    path = Path(data_dir) / SECRET_KEY_FILE
    try:
        _write_private(path, secrets.token_hex(32).encode())
        logger.info("created the session key %s", path)
    except FileExistsError:
        _tighten(path)
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} is too short to be a session key: delete it to make a new one")
    return key


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class AdminPassword:
    """Where the admin password hash lives: the config, else a file in the data folder."""

    def __init__(self, configured_hash: str, data_dir: Path):
        self.configured_hash = configured_hash
        self.path = Path(data_dir) / ADMIN_HASH_FILE

    def current_hash(self) -> str:
        if self.configured_hash:
            return self.configured_hash
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            return ""

    @property
    def is_set(self) -> bool:
        return bool(self.current_hash())

    def check(self, password: str) -> bool:
        from werkzeug.security import check_password_hash

        h = self.current_hash()
        return bool(h) and check_password_hash(h, password)

    def set_first(self, password: str) -> None:
        """Store the first password (first-run setup). Refuses when one is already set."""
        from werkzeug.security import generate_password_hash

        if self.is_set:
            raise PermissionError("an admin password is already set")
        if len(password) < MIN_PASSWORD_LEN:
            raise ValueError(f"the password needs at least {MIN_PASSWORD_LEN} characters")
        _write_private(self.path, generate_password_hash(password).encode())
        logger.info("admin password set (stored in %s)", self.path)


class RateLimiter:
    """At most ``per_minute`` failed attempts per client in any 60 s window."""

    def __init__(self, per_minute: int, window_s: float = 60.0, clock=time.monotonic):
        self.per_minute, self.window_s, self.clock = per_minute, window_s, clock
        self._fails: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def _prune(self, key: str) -> deque:
        q = self._fails[key]
        cutoff = self.clock() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def retry_after_s(self, key: str) -> int:
        """0 when an attempt is allowed now, else the seconds to wait."""
        with self._lock:
            q = self._prune(key)
            if len(q) < self.per_minute:
                return 0
            return max(1, int(q[0] + self.window_s - self.clock()) + 1)

    def failed(self, key: str) -> None:
        with self._lock:
            self._prune(key).append(self.clock())

    def reset(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)
