"""Security hooks of the page: session secret, CSRF, technician PIN, admin password, rate limits.

- The Flask session is signed with a key kept in the data folder (``secret_key``, mode 0600, made on
  first run), so sessions survive restarts and no secret lives in the config or the code.
- Every POST carries the session's CSRF token, in a hidden ``csrf_token`` field or an ``X-CSRF-Token``
  header; a missing or wrong token is a 400. Cookies are HttpOnly and SameSite=Lax.
- ``security.technician_pin``, when set, is asked once per session before any technician page.
- The admin password is stored only as a werkzeug hash: ``security.admin_password_hash`` in the config
  file, or in ``settings.json`` in the data folder when it was chosen or changed on the admin page.
  There is no default password: until one is set, ``/admin/setup`` asks for a one-time setup code
  that the service prints to its log (the journal) at start-up, so only someone who can read the
  device's log (its owner) chooses it, not whoever on the LAN opens the page first.
- A session remembers the admin or PIN sign-in as an HMAC of the current hash or PIN under the session
  key: changing the password or the PIN signs every other session out. (The cookie is signed, not
  encrypted, so it never carries the PIN or anything it could be guessed from.)
- An admin sign-in is also kept on the device (:class:`AdminSessions`, in memory): signing out ends it
  there, so a copy of the cookie taken before (another browser, a shared laptop's profile) is refused
  afterwards. A restart of the service signs every admin out.
- Failed sign-ins, PINs and setup codes are rate-limited per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_KEY_FILE = "secret_key"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
MIN_PASSWORD_LEN = 8
MAX_TRACKED_CLIENTS = 10_000  # distinct addresses remembered by a rate limiter


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


def too_many(what: str, wait: int, everyone: bool) -> str:
    """The answer to an attempt the rate limit refused (``what``: "wrong PINs", ...)."""
    if everyone:  # not this person's typos: someone on the LAN may be guessing
        return (f"too many sign-in attempts on this device from all computers together: try again in {wait} s "
                "(if this keeps happening, tell the admin: someone on the network may be guessing)")
    return f"too many {what}: try again in {wait} s"


def tokens_match(expected: str | None, given: str | None) -> bool:
    # as bytes: compare_digest raises TypeError on str with non-ASCII characters (a 500, before any limit)
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected).encode(), str(given).encode())


def hash_password(password: str) -> str:
    """A werkzeug hash of a new admin password. Raises ValueError for one that is too short."""
    from werkzeug.security import generate_password_hash

    if len(password) < MIN_PASSWORD_LEN:
        raise ValueError(f"the password needs at least {MIN_PASSWORD_LEN} characters")
    if not password.strip():
        raise ValueError("the password cannot be only spaces")
    return generate_password_hash(password)


def check_password(password_hash: str, password: str) -> bool:
    from werkzeug.security import check_password_hash

    return bool(password_hash) and bool(password) and check_password_hash(password_hash, password)


def fingerprint(key: bytes | str, value: str) -> str:
    """HMAC-SHA256 of ``value`` under the session key: what a session keeps to show it signed in."""
    k = key.encode() if isinstance(key, str) else key
    return hmac.new(k, value.encode(), hashlib.sha256).hexdigest()[:32]


# Setup codes avoid characters that read alike in a terminal (0/O, 1/I/L).
SETUP_CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
SETUP_CODE_LEN = 8  # 31^8: about 40 bits, tried at most login_attempts_per_minute times a minute


def local_path(target: str | None, prefix: str = "/") -> str | None:
    """``target`` when it is a path on this device under ``prefix``, else None: a ``next=`` must never send
    a browser to another site. Browsers drop tab, CR and LF inside a URL, so "/\t/evil.com" would become
    "//evil.com" (another host); control characters, spaces and backslashes are refused outright."""
    if not target or not target.startswith(prefix) or target.startswith("//"):
        return None
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F or ch == "\\" for ch in target):
        return None
    return target


def new_setup_code() -> str:
    code = "".join(secrets.choice(SETUP_CODE_ALPHABET) for _ in range(SETUP_CODE_LEN))
    return f"{code[:4]}-{code[4:]}"


def setup_code_matches(expected: str | None, given: str | None) -> bool:
    """Case, spaces and dashes do not matter: the code is read off a terminal and typed."""
    def norm(v: str) -> str:
        return "".join(ch for ch in v.upper() if ch.isalnum())

    return bool(expected) and bool(given) and hmac.compare_digest(norm(expected).encode(), norm(str(given)).encode())


class RateLimiter:
    """At most ``per_minute`` failed attempts per client in any 60 s window, and ``total_per_minute`` attempts
    from all clients together (a LAN lends one attacker many addresses: 23 of them found a 4-digit PIN in
    0.6 s).

    :meth:`acquire` counts an attempt before it is checked, so attempts made at once (a slow password hash
    in parallel threads let 11 of 40 through a limit of 5) cannot all pass; a right answer then
    :meth:`reset` clears the client's count.
    """

    TOTAL = "\0all"  # the key of the count over all clients

    def __init__(self, per_minute: int, window_s: float = 60.0, clock=time.monotonic,
                 total_per_minute: int | None = None):
        self.per_minute, self.window_s, self.clock = per_minute, window_s, clock
        self.total_per_minute = total_per_minute
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> tuple[int, bool]:
        """Count an attempt by ``key``: (0, False), or (seconds to wait, whether the limit over all clients is
        the one reached) with nothing counted."""
        with self._lock:
            now = self.clock()
            waits = []
            for k, limit in ((key, self.per_minute), (self.TOTAL, self.total_per_minute)):
                q = self._recent(k)
                if limit is not None and q is not None and len(q) >= limit:
                    waits.append((max(1, int(q[0] + self.window_s - now) + 1), k == self.TOTAL))
            if waits:
                return max(waits)
            for k in (key, self.TOTAL) if self.total_per_minute is not None else (key,):
                self._append(k, now)
            return 0, False

    def _recent(self, key: str) -> deque | None:
        """The client's failures inside the window; a client with none is forgotten."""
        q = self._fails.get(key)
        if q is None:
            return None
        cutoff = self.clock() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._fails[key]
            return None
        return q

    def _append(self, key: str, t: float) -> None:
        """Under the lock."""
        q = self._recent(key)
        if q is None:
            if len(self._fails) >= MAX_TRACKED_CLIENTS:
                for k in list(self._fails):
                    self._recent(k)
            q = self._fails[key] = deque()
        q.append(t)

    def reset(self, key: str) -> None:
        """A right answer: the client's count is cleared, and its attempt leaves the count over all clients."""
        with self._lock:
            if self._fails.pop(key, None) is not None and self.total_per_minute is not None:
                total = self._recent(self.TOTAL)
                if total:
                    total.pop()


class AdminSessions:
    """The admin sign-ins alive on this device, by a random id the session cookie carries.

    The cookie is signed, not stored: without this, "Sign out" only dropped the mark from the browser that
    pressed it, and a copy of the cookie stayed an admin for the rest of its 12 hours. Kept in memory on
    purpose: a restart (a reboot) ends every admin sign-in, which costs the admin one password entry.
    At most ``max_alive`` at once; the oldest sign-in ends first.
    """

    def __init__(self, max_age_s: float, max_alive: int = 64, clock=time.monotonic):
        self.max_age_s, self.max_alive, self.clock = max_age_s, max_alive, clock
        self._alive: dict[str, float] = {}  # id -> when it signed in (insertion order = age)
        self._lock = threading.Lock()

    def start(self) -> str:
        sid = secrets.token_urlsafe(24)
        with self._lock:
            self._prune()
            while len(self._alive) >= self.max_alive:
                del self._alive[next(iter(self._alive))]
                logger.warning("%d admin sign-ins at once: the oldest was signed out", self.max_alive)
            self._alive[sid] = self.clock()
        return sid

    def alive(self, sid) -> bool:
        if not isinstance(sid, str):
            return False
        with self._lock:
            self._prune()
            return sid in self._alive

    def end(self, sid) -> None:
        with self._lock:
            if isinstance(sid, str):
                self._alive.pop(sid, None)

    def end_all_but(self, sid) -> None:
        """A changed password: every other admin sign-in ends."""
        with self._lock:
            self._alive = {k: t for k, t in self._alive.items() if k == sid}

    def _prune(self) -> None:
        cutoff = self.clock() - self.max_age_s
        for k in [k for k, t in self._alive.items() if t < cutoff]:
            del self._alive[k]
