"""The device's records: slides, fields and cells in SQLite, images as files beside it.

Durability. The database runs in WAL mode with ``synchronous=FULL``: each commit fsyncs the WAL, so a
field acknowledged to the page survives ``kill -9`` *and* a power cut (with ``NORMAL``, WAL commits
survive a process crash but the last ones may roll back on power loss, which a battery-less Pi on a
clinic's mains sees). The price is one fsync per commit, a few milliseconds beside a field's analysis.
A field's images are written first (temp file, fsync, rename, fsync of the folder) and only then is
the row that names them committed: a row never points at a missing file. Flagged-cell crops are small
and can be many (a heavily infected field flags dozens); when the raw frame is kept they are renamed
into place without an fsync each, because :func:`device.service.ensure_crop` cuts a lost one again
from the raw frame and the cell's box in the database.

Files are named from row data (slide ID and a random key stored in the row), never from a request.
A crash in the middle of a field leaves a temp file or images no row names; opening the store removes
them (see :meth:`Store._remove_interrupted_writes`).

Schema changes are an ordered list of migrations; ``PRAGMA user_version`` says how many have run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device.config import REVIEW_FLOOR_RANGE

logger = logging.getLogger(__name__)

DB_NAME = "malaria-detect.sqlite3"
IMAGES_DIR = "images"
# Below this much free space a start-up that SQLite fails with an I/O error is a full card: opening the
# records writes their shared-memory index (32 kB) and WAL; a full tmpfs failed it as SQLITE_IOERR_SHMSIZE.
START_FREE_BYTES = 4 * 1024 * 1024
MIGRATION_COPY_MARGIN = 50 * 1024 * 1024  # left free after the copy made before a schema migration
REVIEW_DECISIONS = ("confirmed", "rejected")
_ANY = object()  # review_cell without a "seen" decision: whatever is stored is replaced
# A field that counts (alias f): not rejected by the quality gate, not taken out by the technician.
_COUNTED = "f.rejected IS NULL AND f.excluded IS NULL"
# A cell near the threshold: not flagged, but scored at least the slide's review floor (slides s joined);
# device.analysis.near_threshold says the same of a cell being analysed. No floor lies below the lowest
# allowed one: said in the query too, so that the partial index cells_near (unflagged cells from 0.5,
# migration 10) serves it; SQLite cannot see that a floor read from the slides row implies it.
_NEAR = (f"c.infected = 0 AND c.p_infected >= {REVIEW_FLOOR_RANGE[0]!r} AND s.review_floor IS NOT NULL"
         " AND c.p_infected >= s.review_floor")
# A temp file older than this is what a crash (kill -9, power cut) left mid-write; a live one is milliseconds old.
STALE_TEMP_S = 60.0

# Ordered migrations: MIGRATIONS[i] takes the schema from version i to i + 1. Never edit a shipped one;
# append a new one.
MIGRATIONS: list[str] = [
    # 1: slides, fields, cells
    """
    CREATE TABLE slides (
        id INTEGER PRIMARY KEY,
        sample_id TEXT NOT NULL,
        patient_id TEXT NOT NULL DEFAULT '',
        operator TEXT NOT NULL DEFAULT '',
        notes TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'finished')),
        started_at TEXT NOT NULL,
        finished_at TEXT,
        model_name TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        threshold REAL NOT NULL,
        fp_rate_per_cell REAL NOT NULL,
        target_rbc INTEGER NOT NULL,
        rbc_per_ul REAL NOT NULL,
        rbc_per_ul_measured INTEGER NOT NULL DEFAULT 0,
        result_json TEXT
    );
    CREATE INDEX slides_sample_id ON slides (sample_id);
    CREATE INDEX slides_started_at ON slides (started_at);
    CREATE TABLE fields (
        id INTEGER PRIMARY KEY,
        slide_id INTEGER NOT NULL REFERENCES slides (id),
        seq INTEGER NOT NULL,
        captured_at TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('camera', 'upload')),
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        rejected TEXT,
        focus REAL NOT NULL,
        rbc_count INTEGER NOT NULL,
        infected_count INTEGER NOT NULL,
        model_sha256 TEXT NOT NULL,
        threshold REAL NOT NULL,
        timing_json TEXT NOT NULL DEFAULT '{}',
        file_key TEXT NOT NULL,
        has_raw INTEGER NOT NULL DEFAULT 0,
        UNIQUE (slide_id, seq)
    );
    CREATE TABLE cells (
        id INTEGER PRIMARY KEY,
        field_id INTEGER NOT NULL REFERENCES fields (id),
        idx INTEGER NOT NULL,
        x INTEGER NOT NULL,
        y INTEGER NOT NULL,
        w INTEGER NOT NULL,
        h INTEGER NOT NULL,
        p_infected REAL NOT NULL,
        infected INTEGER NOT NULL,
        has_crop INTEGER NOT NULL DEFAULT 0,
        review TEXT CHECK (review IN ('confirmed', 'rejected')),
        reviewed_at TEXT,
        reviewed_by TEXT NOT NULL DEFAULT '',
        UNIQUE (field_id, idx)
    );
    CREATE INDEX cells_flagged ON cells (field_id) WHERE infected = 1;
    """,
    # 2: the camera view each counted field was captured from (a small gray PNG), so "this field is
    # already counted" survives a restart: a power cut must not let the same field be counted twice
    """
    CREATE TABLE field_views (
        field_id INTEGER PRIMARY KEY REFERENCES fields (id),
        png BLOB NOT NULL
    );
    """,
    # 3: a field the technician took out of the count (wrong slide or area, an area counted twice): kept
    # with its reason, time and cells, and counted again if they change their mind
    """
    ALTER TABLE fields ADD COLUMN excluded TEXT;
    ALTER TABLE fields ADD COLUMN excluded_at TEXT;
    """,
    # 4: an admin confirmed the clock right while records dated by a clock that ran ahead contradicted it:
    # the records up to these ids no longer count against it (in the database, so it travels with a backup)
    """
    CREATE TABLE clock_confirmations (
        id INTEGER PRIMARY KEY,
        confirmed_at TEXT NOT NULL,
        up_to_slide_id INTEGER NOT NULL,
        up_to_field_id INTEGER NOT NULL
    );
    """,
    # 5: the annotated image of a field of a finished slide can be deleted to free space (Free space);
    # the row then says so, as has_raw does for the raw frame
    """
    ALTER TABLE fields ADD COLUMN has_annotated INTEGER NOT NULL DEFAULT 1;
    """,
    # 6: empty slides discarded by the technician (started by mistake): kept here so that their number
    # is never given to another slide (a tab still showing the discarded one would capture into it)
    """
    CREATE TABLE discarded_slides (
        id INTEGER PRIMARY KEY,
        sample_id TEXT NOT NULL,
        started_at TEXT NOT NULL,
        discarded_at TEXT NOT NULL
    );
    """,
    # 7: the highest field number when a slide was discarded: its (rejected) fields' numbers are not
    # given again either (a page or a cached picture naming one must not show another patient's field)
    """
    ALTER TABLE discarded_slides ADD COLUMN fields_up_to INTEGER NOT NULL DEFAULT 0;
    """,
    # 8: a finished slide takes no more fields, so its fields' camera views (about 15 kB each, three
    # quarters of the database's growth) are no longer needed: those kept so far go (finish_slide drops
    # them from now on), and their pages are reused
    """
    DELETE FROM field_views WHERE field_id IN
        (SELECT f.id FROM fields f JOIN slides s ON s.id = f.slide_id WHERE s.status != 'open');
    """,
    # 9: cells scored just below the threshold ("near the threshold", p_infected >= review_floor) are shown
    # for review too, as the slide was started: a person may find there the parasites the model missed.
    # NULL (slides started before): none
    """
    ALTER TABLE slides ADD COLUMN review_floor REAL;
    CREATE INDEX cells_unflagged ON cells (field_id, p_infected) WHERE infected = 0;
    """,
    # 10: that index held every unflagged cell, nearly all of them: a third of the database's size (48 MB of
    # 152 MB for 2.1 million cells) and of its growth. Cells near the threshold start at the lowest review
    # floor allowed (0.5, config.REVIEW_FLOOR_RANGE), where a field holds a few percent of its cells
    """
    DROP INDEX cells_unflagged;
    CREATE INDEX cells_near ON cells (field_id, p_infected) WHERE infected = 0 AND p_infected >= 0.5;
    """,
    # 11: a finished slide's cells may still be reviewed (a microscopist confirms later), which can change
    # its result after a report was printed and filed: how many review decisions changed after Finish, and
    # when the last did, so that the result and the report say they were amended (an undo leaves no
    # reviewed_at on the cell: the count here keeps it). Slides amended before this version: the decisions
    # dated after their Finish, a lower bound (their undos left no date)
    """
    ALTER TABLE slides ADD COLUMN review_changes_after_finish INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE slides ADD COLUMN last_review_change_after_finish_at TEXT;
    UPDATE slides SET
        review_changes_after_finish = (SELECT COUNT(*) FROM cells c JOIN fields f ON f.id = c.field_id
                                       WHERE f.slide_id = slides.id AND c.reviewed_at > slides.finished_at),
        last_review_change_after_finish_at = (SELECT MAX(c.reviewed_at) FROM cells c JOIN fields f ON f.id = c.field_id
                                              WHERE f.slide_id = slides.id AND c.reviewed_at > slides.finished_at)
    WHERE status = 'finished' AND finished_at IS NOT NULL;
    """,
]
EXCLUDE_REASONS = ("wrong slide or area", "same area counted twice", "thick or damaged area", "other")
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used (e.g. made by a newer version); the message says what to do."""


class SchemaTooNew(StoreError):
    """The database was made by a newer version of the software: retrying cannot help."""


class RecordsDamaged(StoreError):
    """The records failed their integrity check, or SQLite met a damaged page: nothing more is written to
    them (a write into a damaged file can spread the damage, and a slide counted into it may be lost)."""


def _error_name(exc: BaseException) -> str:
    """SQLite's extended error name ("SQLITE_IOERR_SHMSIZE"), or "" for other exceptions."""
    return getattr(exc, "sqlite_errorname", "") or ""


def is_damage(exc: BaseException) -> bool:
    """SQLite found the file damaged (not locked, full or unwritable: those leave the records intact)."""
    return isinstance(exc, sqlite3.DatabaseError) and _error_name(exc).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The request contradicts the record (a finished slide, another model)."""


class OpenSlideConflict(Conflict):
    """A slide of this sample is open already: ``slide_id`` is that slide's."""

    def __init__(self, slide_id: int, message: str) -> None:
        super().__init__(message)
        self.slide_id = slide_id


def utc_now() -> str:
    return _utc_text(datetime.now(UTC))


@dataclass(frozen=True)
class ModelInfo:
    """What a result was made with."""

    name: str
    sha256: str
    threshold: float
    fp_rate_per_cell: float


@dataclass(frozen=True)
class FieldImages:
    """Encoded images of one field: what the store writes beside the database."""

    annotated_jpeg: bytes
    raw_jpeg: bytes | None
    crops_jpeg: dict[int, bytes]  # cell index -> crop, for the cells flagged infected or near the threshold


def pending_migrations(data_dir: str | Path) -> int:
    """How many schema migrations opening the records in ``data_dir`` will run (0: none, or no records)."""
    path = Path(data_dir) / DB_NAME
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return max(0, len(MIGRATIONS) - conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0  # Store says what is wrong with it


def migrate(conn: sqlite3.Connection, migrations: list[str] | None = None) -> int:
    """Bring the schema up to date, one transaction per migration. Returns the final version."""
    migrations = MIGRATIONS if migrations is None else migrations
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise SchemaTooNew(f"the database is at schema version {version}, newer than this software "
                           f"({len(migrations)}): install the newer software or restore a matching backup")
    if version == len(migrations):
        return version
    # Debian's SQLite zeroes every page a DELETE frees (secure_delete on): migration 8 then wrote
    # about 2.8x the database (the copy before it included) and left a WAL as large as the views.
    conn.execute("PRAGMA secure_delete = FAST")
    for i in range(version, len(migrations)):
        try:
            # executescript runs the script as written; BEGIN/COMMIT make the migration and its version
            # number one transaction.
            conn.executescript(f"BEGIN IMMEDIATE;\n{migrations[i]}\nPRAGMA user_version = {i + 1};\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"database migration {i + 1} failed: {exc}") from exc
        logger.info("database schema migrated to version %d", i + 1)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the migrations' WAL back to the card
    return len(migrations)


def _image_name(key: str, kind: str) -> str:
    """File name of a field's image (``kind``: "annotated", "raw" or "cell<idx>"); the key comes first,
    as the clean-up of interrupted writes reads it."""
    return f"{key}_{kind}.jpg"


def _utc_text(t: datetime) -> str:
    """A time as the records write it (:func:`utc_now`), so that the text compares as the time does."""
    return t.astimezone(UTC).isoformat(timespec="seconds")


def _record_counts(conn: sqlite3.Connection) -> dict:
    """{"slides", "open", "fields"}: how many records a database (or a copy of it) holds."""
    s = conn.execute("SELECT COUNT(*), COALESCE(SUM(status = 'open'), 0) FROM slides").fetchone()
    fields = conn.execute("SELECT COUNT(*) FROM fields").fetchone()[0]
    return {"slides": int(s[0]), "open": int(s[1]), "fields": int(fields)}


def _chunks(items: list, n: int) -> Iterator[list]:
    """``items`` in lists of at most ``n`` (SQLite limits the parameters of one statement)."""
    for i in range(0, len(items), n):
        yield items[i : i + n]


def sync_filesystem(path: Path) -> None:
    """Write everything cached for the file system holding ``path`` to the card, raising OSError when that
    failed (syncfs(2), which reports write-back errors since Linux 5.8; os.sync() reports nothing and is
    the fallback where libc has no syncfs)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{os.strerror(err)}: writing to the storage of {path} failed")
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a file created, renamed or deleted in it) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True, sync_data: bool = True,
                 mode: int | None = None) -> None:
    """Write a file so that it is either absent or complete, even after a power cut.

    Temp file in the same folder (mode 0600 unless ``mode``), data fsynced, renamed over the target,
    folder fsynced. Without ``sync_data`` a crash leaves the old file, the new one, or (power cut) an
    empty one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync_data:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def sample_key(sample_id: str) -> str:
    """What makes two sample IDs the same sample: case (beyond A-Z: SQLite's lower() folds A-Z only) and
    look-alike forms (NFKC: a composed or decomposed accent, full-width letters) do not count."""
    return unicodedata.normalize("NFKC", sample_id).casefold()


def _sample_match(query: str) -> Callable[[dict], bool]:
    """Whether a row's sample ID contains ``query``, compared as :func:`sample_key` compares IDs."""
    key = sample_key(query.strip())
    return lambda row: key in sample_key(row["sample_id"])


def _backup_temp_files(target: Path) -> list[Path]:
    """The temporary copy :meth:`Store.backup` writes before it is renamed to ``target``, and its journal."""
    tmp = target.with_name(f".{target.name}.tmp")
    return [tmp, tmp.with_name(tmp.name + "-journal")]


def _cannot_write(folder: Path) -> str | None:
    """Why no file can be made in ``folder`` (a read-only card, no permission), or None when one can."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _read_error(path: Path) -> str | None:
    """Why ``path`` cannot be read to its end (an SD card failing a read: EIO), or None when it can.

    SQLite 3.40 reports a read that failed with EIO as SQLITE_CORRUPT ("database disk image is malformed"),
    like damage written into the file: reading the file tells the two apart. It reads the whole file
    (0.14 s for 203 MB on this machine, cold), once, when damage is found.
    """
    try:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _findings(rows: list[str]) -> str:
    """quick_check's findings on one line (it heads the first with "*** in database main ***")."""
    return "; ".join(line for r in rows for line in r.splitlines() if not line.startswith("***"))


def _row(r: sqlite3.Row | None) -> dict | None:
    return None if r is None else dict(r)


def holds_data(path: Path) -> bool:
    """A file that exists and is not empty: a crop or picture that can be shown (a write a power cut
    interrupted can leave an empty one)."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


class Store:
    """SQLite records under ``data_dir``; safe to use from several threads (one connection each).

    Args:
        data_dir: created (mode 0700) if missing; holds the database and ``images/``.
    """

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.images_dir = self.data_dir / IMAGES_DIR
        self.images_dir.mkdir(exist_ok=True, mode=0o700)
        # A picture folder numbered above every slide the records know is a slide of records replaced by an
        # older copy (a restore): a new slide must not take its number, or finishing it would delete
        # those pictures as files no record names (and a tab left open on that slide would reach it).
        self._unknown_folders_up_to = self._highest_slide_folder()
        self.db_path = self.data_dir / DB_NAME
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self.damage: str | None = None  # what the integrity check or a damaged page said (mark_damaged)
        try:
            self._copy_before_migrating()
            conn = self._conn()
            for path in (self.db_path, *(self.db_path.with_name(DB_NAME + s) for s in ("-wal", "-shm"))):
                with contextlib.suppress(OSError):  # patient records: owner only, also in a folder made 0755
                    os.chmod(path, 0o600)  # before (outside the systemd unit, whose umask is 0077)
            self.schema_version = migrate(conn)
            # reads every open slide's rows: a damaged table (an SD card failing) shows here, not in migrate
            self.interrupted_files_removed = self._remove_interrupted_writes()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(self._why_unopenable(exc)) from exc
        except StoreError:
            self.close()
            raise

    def _why_unopenable(self, exc: sqlite3.DatabaseError) -> str:
        """What the admin is told when SQLite refused the records at start-up: only damage sends them to a
        backup; a card that cannot be written, is full or failed a read or write leaves intact records
        that a restore would replace (every record since that backup lost)."""
        unwritable = _cannot_write(self.data_dir)
        if unwritable:  # a card remounted read-only keeps it so after a reboot: the records are intact
            return (f"{self.db_path}: the records cannot be opened because {self.data_dir} cannot be written "
                    f"({unwritable}). They are not damaged: do not restore a backup over them. A card that turned "
                    "read-only is failing: copy the data folder off it onto a new card; a folder with the wrong "
                    "owner: give it back to the service's user")
        name = _error_name(exc)
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            free = None
        # a full card fails SQLite's first write (its shared-memory index) as "disk I/O error", not "full"
        if name.startswith("SQLITE_FULL") or (name.startswith("SQLITE_IOERR") and free is not None
                                              and free < START_FREE_BYTES):
            room = "" if free is None else f" ({free / 1e6:.1f} MB free)"
            return (f"{self.db_path}: the records cannot be opened because the card is full{room}. They are "
                    "not damaged: do not restore a backup over them. Free room on the card (files that are not "
                    "this service's: downloads, copies, logs) and start the service again")
        if name.startswith("SQLITE_IOERR"):
            return (f"{self.db_path}: the card failed a read or write ({exc}). The records may be intact: do "
                    "not restore a backup over them; copy the data folder off the card, then check the card "
                    "(the kernel log says which blocks failed) and move the data onto a new one")
        unreadable = _read_error(self.db_path) if is_damage(exc) else None
        if unreadable:  # SQLite calls a failed read "malformed"
            return (f"{self.db_path}: the card failed a read of the records ({unreadable}; SQLite said: {exc}). "
                    "Do not restore a backup over them yet: copy the data folder off the card (what can be read "
                    "of it), then move the data onto a new card and restore the last backup only if the copy "
                    "does not open")
        return f"{self.db_path}: not a usable database ({exc}); move it aside and restore a backup"

    def _highest_slide_folder(self) -> int:
        """The highest N of the ``images/slide-N`` folders (0 if none). A number no slide could have (a stray
        folder: 2^62 or more would leave no number for the next slide) is logged and passed over."""
        try:
            names = [p.name for p in self.images_dir.iterdir() if p.is_dir()]
        except OSError as exc:  # before the records are opened: said as plainly as their own errors
            raise StoreError(f"{self.images_dir} cannot be read ({exc}): a folder with the wrong owner: give it "
                             "back to the service's user") from exc
        numbers = []
        for name in names:
            m = re.fullmatch(r"slide-([0-9]+)", name)
            if m is None:
                continue
            if int(m.group(1)) >= 2**62:
                logger.warning("%s: not a slide's picture folder (no slide has that number): left alone",
                               self.images_dir / name)
                continue
            numbers.append(int(m.group(1)))
        return max(numbers, default=0)

    def _copy_before_migrating(self) -> None:
        """Copy records an upgrade is about to migrate to ``<database>.before-schema-<N>`` beside them.

        A migration cannot be undone, and going back to the previous software needs the records as it
        left them. Skipped (with a warning, the upgrade goes on) when the card has not room for two copies
        or the copy fails; not made again by a start after one whose migration failed.
        """
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not 0 < version < len(MIGRATIONS):
            return
        copy = self.db_path.with_name(f"{DB_NAME}.before-schema-{len(MIGRATIONS)}")
        for part in _backup_temp_files(copy):  # a copy a crash or power cut cut short: it only takes room
            with contextlib.suppress(OSError):
                part.unlink()
        wal = self.db_path.with_name(DB_NAME + "-wal")
        # a WAL just created by opening the records is empty: only one holding writes is newer records
        live = [p for p in (self.db_path, wal) if p.exists() and (p is self.db_path or p.stat().st_size)]
        if copy.exists() and copy.stat().st_mtime >= max(p.stat().st_mtime for p in live):
            return  # made by an earlier start whose migration failed; nothing changed since
        size = self.database_bytes()
        if shutil.disk_usage(self.data_dir).free < 2 * size + MIGRATION_COPY_MARGIN:
            logger.warning("no copy of the records before the schema migration to version %d: not enough "
                           "free space for one (%.0f MB)", len(MIGRATIONS), size / 1e6)
            return
        try:
            self.backup(copy)  # checked and synced, or absent
            os.chmod(copy, 0o600)  # patient records: owner only
        except (StoreError, sqlite3.Error, OSError) as exc:  # the copy failed, not the records: migrate all the same
            logger.warning("no copy of the records before the schema migration to version %d: %s",
                           len(MIGRATIONS), exc)
            return
        logger.info("records copied to %s before the schema migration to version %d", copy, len(MIGRATIONS))

    def _remove_interrupted_writes(self) -> int:
        """Delete what a crash (kill -9, power cut) left of a field it cut short; returns how many files.

        That is the temp file of a write not renamed yet (see :func:`write_atomic`) and the images of a
        field whose row was never committed: no row names them, so each crash would leak a few MB. A field
        is only ever written to an open slide, so only open slides' folders are looked at (start-up stays
        quick with years of records), and only files older than ``STALE_TEMP_S`` (a write in progress is
        milliseconds old, should another process have the folder open); what is younger, or dated ahead
        by a clock that was behind, goes when the slide is finished (:meth:`finish_slide`). The folder
        of a slide discarded just before a crash goes too.
        """
        cutoff = time.time() - STALE_TEMP_S
        conn = self._conn()
        n = sum(self._remove_unnamed(slide_id, cutoff)
                for (slide_id,) in conn.execute("SELECT id FROM slides WHERE status = 'open'").fetchall())
        has_discarded = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'discarded_slides'").fetchone()
        for (slide_id,) in conn.execute("SELECT id FROM discarded_slides").fetchall() if has_discarded else []:
            folder = self._slide_dir(slide_id)
            if folder.is_dir():  # deleted after the discard's commit: a crash in between left it
                n += sum(1 for p in folder.iterdir() if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        if n:
            logger.warning("removed %d image file(s) of open slides that no record names: left by a write that a "
                           "crash or power cut interrupted, or by records restored from an older copy", n)
        return n

    def _remove_unnamed(self, slide_id: int, older_than: float | None = None) -> int:
        """Delete the files in a slide's folder that no field row names (and write_atomic's temp files),
        only those older than ``older_than`` (epoch seconds) when given; returns how many."""
        folder = self._slide_dir(slide_id)
        if not folder.is_dir():
            return 0
        conn = self._conn()
        keys = {r[0] for r in conn.execute("SELECT file_key FROM fields WHERE slide_id = ?", (slide_id,))}
        n = 0
        for p in folder.iterdir():
            interrupted = p.name.endswith(".tmp") if p.name.startswith(".") else p.name.split("_")[0] not in keys
            with contextlib.suppress(OSError):
                if interrupted and (older_than is None or p.stat().st_mtime < older_than):
                    p.unlink()
                    n += 1
        return n

    # -- connections --
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _tx() opens them explicitly.
        conn = sqlite3.connect(self.db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.db_path}: cannot use WAL mode (got {mode}); is it on a network share?")
            conn.execute("PRAGMA synchronous=FULL")  # see the module docstring: survives power loss
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
        except BaseException:
            conn.close()  # not handed out, so close() would never reach it: the file stayed open
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Reads that must agree with each other: one snapshot (a read transaction under WAL), or the
        transaction this thread is already in."""
        conn = self._conn()
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                self.mark_damaged(str(exc))
            raise
        finally:
            conn.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.damage:
            raise RecordsDamaged(f"the records are damaged ({self.damage}): nothing more is written to them")
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException as exc:
            if is_damage(exc):
                self.mark_damaged(str(exc))
            with contextlib.suppress(sqlite3.Error):  # a damaged page can end the transaction itself
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def mark_damaged(self, detail: str) -> None:
        """From now on refuse every write (:class:`RecordsDamaged`); /healthz and the pages say so."""
        if self.damage is None:
            unreadable = _read_error(self.db_path)
            self.damage = f"the card failed a read ({unreadable}): {detail}" if unreadable else detail
            logger.error("%s: the records are damaged (%s): writes refused; copy the data folder off the card, "
                         "then restore a backup (systemd/README.md, Back up and restore)", self.db_path, self.damage)

    def _check_pages(self, conn: sqlite3.Connection) -> str | None:
        """``PRAGMA quick_check`` on ``conn`` (the records, or a page-for-page copy of them): None when it finds
        nothing, else its findings on one line, with the records :meth:`mark_damaged`."""
        found = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if found == ["ok"]:
            return None
        self.mark_damaged(_findings(found))
        return _findings(found)

    def check_integrity(self) -> str | None:
        """Read every page of the records (``PRAGMA quick_check``) on a connection of its own; damage found
        is :meth:`mark_damaged` and returned, else None.

        Opening the records reads only their header, schema and open slides: a page damaged elsewhere (an
        SD card failing) passed start-up, the pages answered 500 and new slides were written into the
        damaged file. The service runs this in the background after start-up: it reads the whole file
        (3.5 s cold, 1.5 s warm for 203 MB of real-schema records here; a Pi's SD card reads 40-90 MB/s),
        too long to hold start-up for years of records. An I/O error is logged and not called damage (a
        read that failed with EIO, which SQLite calls malformed, is named so by :meth:`mark_damaged`).
        """
        t0 = time.perf_counter()
        conn = None
        try:
            conn = self._connect()
            found = self._check_pages(conn)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                logger.warning("%s: the records could not be checked: %s", self.db_path, exc)
                return None
            self.mark_damaged(str(exc))
            found = str(exc)
        finally:
            if conn is not None:
                conn.close()
        if found is None:
            logger.info("records checked: no damage (%.1f s)", time.perf_counter() - t0)
            return None
        return self.damage

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        self._local = threading.local()

    def pragma(self, name: str) -> Any:
        if not name.isidentifier():
            raise ValueError(name)
        return self._conn().execute(f"PRAGMA {name}").fetchone()[0]

    # -- slides --
    def create_slide(self, *, sample_id: str, model: ModelInfo, target_rbc: int, rbc_per_ul: float,
                     rbc_per_ul_measured: bool = False, patient_id: str = "", operator: str = "",
                     notes: str = "", review_floor: float | None = None) -> int:
        """A new open slide. ``review_floor``: cells scored from it up to the threshold are shown for review
        as "near the threshold" (None: none)."""
        lo, hi = REVIEW_FLOOR_RANGE
        if review_floor is not None and not (math.isfinite(review_floor) and lo <= review_floor <= hi):
            raise ValueError(f"the review floor must lie in [{lo:g}, {hi:g}], not {review_floor}")
        # One spelling per text: "É" typed as one character or as E + accent is the same ID (NFC), and
        # the search finds it whichever way it is typed.
        sample_id = unicodedata.normalize("NFC", sample_id.strip())
        if not sample_id:
            raise ValueError("sample ID is required")
        patient_id, operator, notes = (unicodedata.normalize("NFC", v.strip()) for v in (patient_id, operator, notes))
        with self._tx() as c:
            # one open slide per sample, checked inside the write lock (two starts at once made two)
            key = sample_key(sample_id)
            same, same_id = next(((r[0], r[1]) for r in c.execute(
                "SELECT sample_id, id FROM slides WHERE status = 'open'") if sample_key(r[0]) == key), (None, None))
            if same is not None:  # named as it was recorded ("S-001"), not as typed this time ("s-001")
                raise OpenSlideConflict(same_id, f"slide {same} is already open: continue it (open slides are listed "
                                        "on the start page) or finish it first")
            # never a discarded slide's number: a page still showing that slide must not reach this one
            new_id = max(self._unknown_folders_up_to + 1, c.execute(
                "SELECT MAX(COALESCE((SELECT MAX(id) FROM slides), 0),"
                " COALESCE((SELECT MAX(id) FROM discarded_slides), 0)) + 1").fetchone()[0])
            cur = c.execute(
                "INSERT INTO slides (id, sample_id, patient_id, operator, notes, started_at, model_name, model_sha256,"
                " threshold, fp_rate_per_cell, target_rbc, rbc_per_ul, rbc_per_ul_measured, review_floor)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new_id, sample_id, patient_id, operator, notes, utc_now(), model.name,
                 model.sha256, model.threshold, model.fp_rate_per_cell, int(target_rbc), float(rbc_per_ul),
                 int(bool(rbc_per_ul_measured)),
                 None if review_floor is None else float(review_floor)))
            return int(cur.lastrowid)

    def get_slide(self, slide_id: int) -> dict | None:
        return _row(self._conn().execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone())

    def list_slides(self, query: str = "", *, limit: int = 100, offset: int = 0,
                    status: str | None = None) -> list[dict]:
        """Slides, newest first; ``query`` matches part of the sample ID as the one-open-slide rule
        compares IDs (:func:`sample_key`: any case, composed or decomposed accents, full-width letters)."""
        sql = "SELECT * FROM slides WHERE 1 = 1"
        args: list[Any] = []
        if status:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY id DESC"
        if not query.strip():
            return [dict(r) for r in self._conn().execute(sql + " LIMIT ? OFFSET ?", [*args, int(limit), int(offset)])]
        # SQLite's LIKE folds A-Z only: matched here (a device holds thousands of slides, not millions)
        found = filter(_sample_match(query), (dict(r) for r in self._conn().execute(sql, args)))
        return list(itertools.islice(found, int(offset), int(offset) + int(limit)))

    def slide_counts(self) -> dict:
        """{"slides": n, "open": n, "fields": n}: for the admin page."""
        return _record_counts(self._conn())

    def backup(self, target: str | Path) -> dict:
        """Copy the records (the database; not the images) into one self-contained file, while the service
        runs: SQLite's online backup takes a consistent snapshot, so a field committed meanwhile is in
        the copy whole or not at all, and captures are not stopped.

        The copy is checked (``PRAGMA quick_check``), synced and written under a temporary name first:
        ``target`` is either a complete, checked copy or absent. Returns ``{"bytes", "slides", "fields"}``.
        Raises RecordsDamaged when the copy fails its check, OSError when ``target`` cannot be written.
        """
        target = Path(target)
        tmp = _backup_temp_files(target)[0]
        tmp.write_bytes(b"")  # OSError (no such folder, no permission, disk full) before any copying
        try:
            dst = sqlite3.connect(tmp, isolation_level=None)
            try:
                self._conn().backup(dst)
                # the source's WAL mode came with the pages: one file, no -wal/-shm beside it
                dst.execute("PRAGMA journal_mode=DELETE")
                found = self._check_pages(dst)  # the copy holds the records' pages as they are
                if found:
                    raise RecordsDamaged(f"the backup copy failed its check ({found}); the records were not copied")
                counts = _record_counts(dst)
            finally:
                dst.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            for part in _backup_temp_files(target):
                with contextlib.suppress(OSError):
                    part.unlink()
            raise
        return {"bytes": target.stat().st_size, "slides": counts["slides"], "fields": counts["fields"]}

    def database_bytes(self) -> int:
        """Size of the database with its write-ahead log: about what a copy of the records takes."""
        return sum(p.stat().st_size for p in (self.db_path, self.db_path.with_name(self.db_path.name + "-wal"))
                   if p.exists())

    def snapshot(self) -> tuple[bytes, dict]:
        """The records as the bytes of one self-contained SQLite file, made in memory (nothing is written,
        so it works on a full or read-only card): one read transaction checks the database
        (``quick_check``), counts it and copies it, so all three see the same records while captures go on.

        Returns ``(image, {"bytes", "slides", "fields"})``. Raises RecordsDamaged when the check fails.
        """
        conn = self._conn()
        conn.execute("BEGIN")  # a read transaction: the check, the counts and the copy see one snapshot
        try:
            found = self._check_pages(conn)
            if found:
                raise RecordsDamaged(f"the records failed their check ({found}); no copy was made")
            counts = _record_counts(conn)
            image = conn.serialize()
        finally:
            conn.execute("COMMIT")
        return image, {"bytes": len(image), "slides": counts["slides"], "fields": counts["fields"]}

    def newest_record_time(self) -> datetime | None:
        """The latest time the records hold (a slide started or finished, the newest field captured),
        or None without records: the device clock was at that time once, so it cannot now be earlier.
        Records made before an admin confirmed the clock (:meth:`confirm_clock`) do not count."""
        c = self._conn()
        mark = c.execute("SELECT up_to_slide_id, up_to_field_id FROM clock_confirmations ORDER BY id DESC LIMIT 1"
                         ).fetchone() or (0, 0)
        # It runs on every page and status poll: the newest 100 slides only (an index-ordered read, not a
        # scan of years of slides; an older slide finished now is missed, which only weakens the check).
        times = [*c.execute("SELECT MAX(started_at), MAX(finished_at) FROM (SELECT started_at, finished_at"
                            " FROM slides WHERE id > ? ORDER BY id DESC LIMIT 100)", (mark[0],)).fetchone(),
                 *(c.execute("SELECT captured_at FROM fields WHERE id > ? ORDER BY id DESC LIMIT 1",
                             (mark[1],)).fetchone() or ())]
        parsed = []
        for t in times:
            try:
                d = datetime.fromisoformat(t)
            except (TypeError, ValueError):
                continue
            parsed.append(d if d.tzinfo else d.replace(tzinfo=UTC))
        return max(parsed, default=None)

    def confirm_clock(self) -> dict:
        """An admin says the clock is right: the records made so far no longer count against it (their
        times came from a clock that ran ahead, e.g. a date typed wrongly, and stay as they were written).
        Kept in the database, so a restored copy carries the confirmation that goes with its records."""
        with self._tx() as c:
            mark = {"confirmed_at": utc_now(),
                    "up_to_slide_id": int(c.execute("SELECT COALESCE(MAX(id), 0) FROM slides").fetchone()[0]),
                    "up_to_field_id": int(c.execute("SELECT COALESCE(MAX(id), 0) FROM fields").fetchone()[0])}
            c.execute("INSERT INTO clock_confirmations (confirmed_at, up_to_slide_id, up_to_field_id)"
                      " VALUES (:confirmed_at, :up_to_slide_id, :up_to_field_id)", mark)
        logger.warning("the clock was confirmed right at %s: records up to slide %d, field %d no longer count "
                       "against it", mark["confirmed_at"], mark["up_to_slide_id"], mark["up_to_field_id"])
        return mark

    def discard_slide(self, slide_id: int) -> dict:
        """Delete an open slide that counts nothing (started by mistake, or under a wrong sample ID): no
        fields, or only fields the quality gate rejected, which go with it. It holds no result, so nothing
        is lost. Its images folder goes too (a capture cut short by a crash may have left files there).
        Returns the deleted row. Raises NotFound, or Conflict for a finished slide (a record) or one with a
        used or excluded field (taken out of the count with its reason instead)."""
        with self._tx() as c:
            slide = _row(c.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone())
            if slide is None:
                raise NotFound(f"slide {slide_id} not found")
            if slide["status"] != "open":
                raise Conflict(f"slide {slide['sample_id']} is finished: its result is a record and is kept")
            n = c.execute("SELECT COUNT(*) FROM fields WHERE slide_id = ? AND rejected IS NULL",
                          (slide_id,)).fetchone()[0]
            if n:
                raise Conflict(f"slide {slide['sample_id']} has {n} used or excluded field{'s' if n != 1 else ''}, "
                               "which stay in the records: only a slide whose fields were all rejected (or that "
                               "has none) can be discarded; finish this one instead")
            fields = "SELECT id FROM fields WHERE slide_id = ?"
            max_field = c.execute("SELECT COALESCE(MAX(id), 0) FROM fields").fetchone()[0]  # before the delete
            c.execute(f"DELETE FROM cells WHERE field_id IN ({fields})", (slide_id,))
            c.execute(f"DELETE FROM field_views WHERE field_id IN ({fields})", (slide_id,))
            c.execute("DELETE FROM fields WHERE slide_id = ?", (slide_id,))
            c.execute("DELETE FROM slides WHERE id = ?", (slide_id,))
            c.execute("INSERT INTO discarded_slides (id, sample_id, started_at, discarded_at, fields_up_to)"
                      " VALUES (?, ?, ?, ?, ?)", (slide_id, slide["sample_id"], slide["started_at"], utc_now(),
                                                  max_field))
        shutil.rmtree(self._slide_dir(slide_id), ignore_errors=True)  # no row names anything in it now
        logger.info("discarded the slide %d (%s), which counted nothing", slide_id, slide["sample_id"])
        return slide

    def finish_slide(self, slide_id: int, result: Callable[[dict, dict], dict]) -> dict:
        """Close the slide and keep the automatic result as it stood. Raises NotFound / Conflict.

        ``result(slide_row, totals)`` makes the stored result; it runs inside the write lock, so a field
        committed while the slide is being finished is either in that result or refused, never in the
        record but missing from the result.
        """
        with self._tx() as c:
            slide = _row(c.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone())
            if slide is None:
                raise NotFound(f"slide {slide_id} not found")
            if slide["status"] != "open":
                raise Conflict(f"slide {slide['sample_id']} is already finished")
            c.execute("UPDATE slides SET status = 'finished', finished_at = ?, result_json = ? WHERE id = ?",
                      (utc_now(), json.dumps(result(slide, self.totals(slide_id))), slide_id))
            # the views only guard against counting a field twice, and a finished slide takes no more
            c.execute("DELETE FROM field_views WHERE field_id IN (SELECT id FROM fields WHERE slide_id = ?)",
                      (slide_id,))
        # no field comes into a finished slide: what no row names now, a crash left (a write cut short after
        # a restart within a minute, or dated ahead by a clock that was behind, was kept at start-up)
        removed = self._remove_unnamed(slide_id)
        if removed:
            logger.warning("slide %d: removed %d image file(s) left by a write that a crash cut short", slide_id,
                           removed)
        return self.get_slide(slide_id)  # type: ignore[return-value]

    # -- fields --
    def add_field(self, slide_id: int, result, *, source: str, model_sha256: str, images: FieldImages,
                  view_png: bytes | None = None) -> int:
        """Record one analysed field (a ``device.analysis.FieldResult``) and its images.

        Images are written and synced first, then one transaction commits the field, its cells and
        ``view_png`` (the camera view it was captured from, for :meth:`counted_views_png`).
        Raises NotFound / Conflict (finished slide, or a slide started with another model).
        """
        slide = self.get_slide(slide_id)
        if slide is None:
            raise NotFound(f"slide {slide_id} not found")
        self._check_open(slide, model_sha256)
        key = secrets.token_hex(8)
        folder = self._slide_dir(slide_id)
        folder.mkdir(exist_ok=True, mode=0o700)
        written: list[Path] = []

        def write(name: str, data: bytes, **kw) -> None:
            write_atomic(folder / name, data, sync_dir=False, **kw)
            written.append(folder / name)

        try:
            write(_image_name(key, "annotated"), images.annotated_jpeg)
            if images.raw_jpeg is not None:
                write(_image_name(key, "raw"), images.raw_jpeg)
            for idx, jpeg in images.crops_jpeg.items():
                # With the raw frame kept, a crop lost to a power cut is cut again (see the docstring).
                write(_image_name(key, f"cell{int(idx)}"), jpeg, sync_data=images.raw_jpeg is None)
            fsync_dir(folder)  # the renames above are durable before the row that names them
            with self._tx() as c:
                slide = _row(c.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone())
                self._check_open(slide, model_sha256)  # re-checked inside the write lock
                seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM fields WHERE slide_id = ?",
                                (slide_id,)).fetchone()[0]
                # never the number of a discarded slide's field (see migration 7)
                new_id = c.execute("SELECT MAX(COALESCE((SELECT MAX(id) FROM fields), 0),"
                                   " COALESCE((SELECT MAX(fields_up_to) FROM discarded_slides), 0)) + 1").fetchone()[0]
                cur = c.execute(
                    "INSERT INTO fields (id, slide_id, seq, captured_at, source, width, height, rejected, focus,"
                    " rbc_count, infected_count, model_sha256, threshold, timing_json, file_key, has_raw)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (new_id, slide_id, seq, utc_now(), source, result.width, result.height, result.rejected,
                     float(result.focus), result.rbc_count, result.infected_count, model_sha256,
                     float(result.threshold), json.dumps({k: round(v, 2) for k, v in result.timing_ms.items()}),
                     key, int(images.raw_jpeg is not None)))
                field_id = int(cur.lastrowid)
                if view_png is not None and not result.rejected:
                    c.execute("INSERT INTO field_views (field_id, png) VALUES (?, ?)", (field_id, view_png))
                if not result.rejected:
                    c.executemany(
                        "INSERT INTO cells (field_id, idx, x, y, w, h, p_infected, infected, has_crop)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(field_id, i, *(int(v) for v in cell.bbox), float(cell.p_infected), int(cell.infected),
                          int(i in images.crops_jpeg)) for i, cell in enumerate(result.cells)])
        except BaseException:
            # A full disk, a slide finished meanwhile: no row names these files, and a finished slide's
            # folder is never swept at start-up, so they would be left behind for good.
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return field_id

    @staticmethod
    def _check_open(slide: dict | None, model_sha256: str) -> None:
        if slide is None:
            raise NotFound("slide not found")
        if slide["status"] != "open":
            raise Conflict(f"slide {slide['sample_id']} is finished: start a new slide to capture more fields")
        if slide["model_sha256"] != model_sha256:
            raise Conflict(f"slide {slide['sample_id']} was started with another model "
                           f"({slide['model_name']}, sha256 {slide['model_sha256'][:12]}…): finish it and start a "
                           "new slide")

    def counted_views_png(self, slide_id: int) -> dict[int, bytes]:
        """The camera view of each counted (used) field of the slide, by field ID."""
        return {int(r[0]): bytes(r[1]) for r in self._conn().execute(
            "SELECT f.id, v.png FROM field_views v JOIN fields f ON f.id = v.field_id"
            f" WHERE f.slide_id = ? AND {_COUNTED}", (slide_id,))}

    def field_view_png(self, field_id: int) -> bytes | None:
        r = self._conn().execute("SELECT png FROM field_views WHERE field_id = ?", (field_id,)).fetchone()
        return None if r is None else bytes(r[0])

    def exclude_field(self, field_id: int, reason: str | None) -> dict:
        """Take a used field out of the slide's count (``reason``), or count it again (None).

        The field, its cells and images stay in the records. Only while its slide is open: a finished
        result is not changed afterwards. Raises NotFound, Conflict (finished slide, a field the quality
        gate rejected) or ValueError (a reason not in :data:`EXCLUDE_REASONS`).
        """
        if reason is not None and reason not in EXCLUDE_REASONS:
            raise ValueError(f"reason must be one of: {', '.join(EXCLUDE_REASONS)}")
        with self._tx() as c:
            f = c.execute("SELECT f.rejected, f.seq, s.status, s.sample_id FROM fields f JOIN slides s"
                          " ON s.id = f.slide_id WHERE f.id = ?", (field_id,)).fetchone()
            if f is None:
                raise NotFound(f"field {field_id} not found")
            if f["status"] != "open":
                raise Conflict(f"slide {f['sample_id']} is finished: its fields can no longer be changed")
            if f["rejected"] is not None:
                raise Conflict(f"field {f['seq']} was rejected by the quality gate: it counts nothing already")
            c.execute("UPDATE fields SET excluded = ?, excluded_at = ? WHERE id = ?",
                      (reason, utc_now() if reason else None, field_id))
        return self.get_field(field_id)  # type: ignore[return-value]

    def get_field(self, field_id: int) -> dict | None:
        return _row(self._conn().execute("SELECT * FROM fields WHERE id = ?", (field_id,)).fetchone())

    def list_fields(self, slide_id: int) -> list[dict]:
        """The slide's fields; ``has_raw`` and ``has_annotated`` say whether the picture is on the card (a
        records copy restored from a backup holds no pictures: the page shows "(no picture)", not a dead link)."""
        rows = [dict(r) for r in self._conn().execute(
            "SELECT * FROM fields WHERE slide_id = ? ORDER BY seq", (slide_id,))]
        for f in rows:
            for kind, flag in self._IMAGE_FLAG.items():
                if f[flag] and not self._image_path(f["slide_id"], f["file_key"], kind).is_file():
                    f[flag] = 0
        return rows

    def fields_for_export(self, query: str = "", slide_id: int | None = None, *,
                          status: str | None = None, slides_per_read: int = 50) -> Iterator[dict]:
        """The fields of the matching slides (newest slide first, each slide's fields in order), with their
        slide's sample and patient IDs, read a few slides at a time as the caller iterates.

        A year of records (200,000 fields) is never in memory at once (built whole, the export took 343 MB
        more, two at once past the unit's memory limit), and no read transaction stays open while a slow client
        downloads (it would keep the write-ahead log from being written back). Each read of a few slides is
        one snapshot; a field added meanwhile to a slide already read is not in the export.
        """
        sql = "SELECT id, sample_id FROM slides WHERE 1 = 1"
        args: list[Any] = []
        if status:
            sql += " AND status = ?"
            args.append(status)
        if slide_id is not None:
            sql += " AND id = ?"
            args.append(slide_id)
        slides = [dict(r) for r in self._conn().execute(sql + " ORDER BY id DESC", args)]  # thousands, small
        if query.strip():
            slides = list(filter(_sample_match(query), slides))
        ids = [r["id"] for r in slides]

        def read() -> Iterator[dict]:
            for k in range(0, len(ids), slides_per_read):
                group = ids[k : k + slides_per_read]
                rows = self._conn().execute(  # the thread that reads the export (its own connection)
                    "SELECT f.*, s.sample_id, s.patient_id FROM fields f JOIN slides s ON s.id = f.slide_id"
                    f" WHERE f.slide_id IN ({', '.join('?' * len(group))}) ORDER BY f.slide_id DESC, f.seq",
                    group).fetchall()
                yield from (dict(r) for r in rows)

        return read()

    def totals(self, slide_id: int) -> dict:
        """Counts over the slide's fields (used = not rejected by the gate and not excluded by the
        technician) and the review of its flagged cells and of those near the threshold, read in one
        snapshot (a field counted again between two reads gave confirmed cells beyond the infected count)."""
        with self._read() as c:
            return self._totals(c, slide_id)

    def _totals(self, c: sqlite3.Connection, slide_id: int) -> dict:
        f = c.execute(
            f"SELECT COUNT(*) AS fields, COALESCE(SUM({_COUNTED}), 0) AS fields_used,"
            " COALESCE(SUM(rejected IS NOT NULL), 0) AS fields_rejected,"
            " COALESCE(SUM(rejected IS NULL AND excluded IS NOT NULL), 0) AS fields_excluded,"
            " COALESCE(SUM(CASE WHEN excluded IS NULL THEN rbc_count ELSE 0 END), 0) AS rbc_count,"
            " COALESCE(SUM(CASE WHEN excluded IS NULL THEN infected_count ELSE 0 END), 0) AS infected_count"
            " FROM fields f WHERE f.slide_id = ?", (slide_id,)).fetchone()
        def review(which: str) -> dict:
            return dict(c.execute(
                "SELECT COALESCE(SUM(c.review = 'confirmed'), 0) AS confirmed,"
                " COALESCE(SUM(c.review = 'rejected'), 0) AS rejected,"
                " COALESCE(SUM(c.review IS NULL), 0) AS pending"
                " FROM cells c JOIN fields f ON f.id = c.field_id JOIN slides s ON s.id = f.slide_id"
                f" WHERE f.slide_id = ? AND {which} AND {_COUNTED}", (slide_id,)).fetchone())

        out = dict(f)
        out["review"] = review("c.infected = 1")
        # cells near the threshold: not in the automatic count; one a person confirms is a parasite found
        near = review(_NEAR)
        out["near"] = {"cells": near["confirmed"] + near["rejected"] + near["pending"], **near}
        # After review: the automatic count less the cells a technician rejected, plus the cells near the
        # threshold they confirmed.
        out["reviewed_infected_count"] = (out["infected_count"] - out["review"]["rejected"]
                                          + out["near"]["confirmed"])
        return out

    # -- cells --
    def flagged_cells(self, slide_id: int) -> list[dict]:
        """The slide's counted flagged cells; ``has_crop`` says whether a crop can be shown, as
        :func:`device.service.ensure_crop` finds it: its file holds data, or the raw frame it is cut again
        from is on the card (not so in a records copy restored from a backup)."""
        return self._review_cells(slide_id, "c.infected = 1", "f.seq, c.idx")

    def near_cells(self, slide_id: int) -> list[dict]:
        """The slide's counted cells near the threshold (not flagged, scored at least its review floor),
        highest score first; ``has_crop`` as in :meth:`flagged_cells`."""
        return self._review_cells(slide_id, _NEAR, "c.p_infected DESC, f.seq, c.idx")

    def _review_cells(self, slide_id: int, which: str, order: str) -> list[dict]:
        rows = [dict(r) for r in self._conn().execute(
            "SELECT c.*, f.seq AS field_seq, f.file_key AS _key, f.has_raw AS _has_raw FROM cells c"
            " JOIN fields f ON f.id = c.field_id JOIN slides s ON s.id = f.slide_id"
            f" WHERE f.slide_id = ? AND {which} AND {_COUNTED} ORDER BY {order}", (slide_id,))]
        for c in rows:
            key, has_raw = c.pop("_key"), c.pop("_has_raw")
            if c["has_crop"] and not holds_data(self._image_path(slide_id, key, f"cell{int(c['idx'])}")):
                c["has_crop"] = int(bool(has_raw) and self._image_path(slide_id, key, "raw").is_file())
        return rows

    def field_cells(self, field_id: int) -> list[dict]:
        return [dict(r) for r in self._conn().execute(
            "SELECT * FROM cells WHERE field_id = ? ORDER BY idx", (field_id,))]

    def get_cell(self, cell_id: int) -> dict | None:
        """The cell with its field's slide and file key; ``near``: 1 when it is near the threshold."""
        return _row(self._conn().execute(
            f"SELECT c.*, f.slide_id, f.seq AS field_seq, f.file_key, ({_NEAR}) AS near FROM cells c"
            " JOIN fields f ON f.id = c.field_id"
            " JOIN slides s ON s.id = f.slide_id WHERE c.id = ?", (cell_id,)).fetchone())

    def review_cell(self, cell_id: int, decision: str | None, by: str = "", *,
                    seen: str | None | object = _ANY) -> dict:
        """Record a technician's decision on a flagged cell or one near the threshold (None clears it). The
        model's verdict stays.

        ``seen``: the decision the person saw on their page (None: none yet). When another window changed
        it meanwhile, Conflict is raised instead of silently overwriting that decision.
        """
        if decision is not None and decision not in REVIEW_DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(REVIEW_DECISIONS)}")
        with self._tx() as c:
            cell = c.execute(f"SELECT c.infected, ({_NEAR}) AS near, c.review, f.excluded, f.seq, s.id AS slide_id,"
                             " s.status FROM cells c"
                             " JOIN fields f ON f.id = c.field_id JOIN slides s ON s.id = f.slide_id"
                             " WHERE c.id = ?", (cell_id,)).fetchone()
            if cell is None:
                raise NotFound(f"cell {cell_id} not found")
            if not cell["infected"] and not cell["near"]:
                raise Conflict("only cells flagged infected or near the threshold are reviewed")
            if cell["excluded"] is not None:
                raise Conflict(f"field {cell['seq']} is out of the count ({cell['excluded']}): its cells are not "
                               "reviewed unless it is counted again")
            if seen is not _ANY and seen != cell["review"]:
                stored = {"confirmed": "a parasite", "rejected": "not a parasite"}.get(cell["review"], "not reviewed")
                raise Conflict(f"this cell was changed in another window meanwhile (now: {stored}): the page shows "
                               "it again; decide once more if needed")
            now = utc_now()
            c.execute("UPDATE cells SET review = ?, reviewed_at = ?, reviewed_by = ? WHERE id = ?",
                      (decision, now if decision else None, by if decision else "", cell_id))
            if cell["status"] == "finished" and decision != cell["review"]:  # the filed result may change
                c.execute("UPDATE slides SET review_changes_after_finish = review_changes_after_finish + 1,"
                          " last_review_change_after_finish_at = ? WHERE id = ?", (now, cell["slide_id"]))
        return self.get_cell(cell_id)  # type: ignore[return-value]

    # -- freeing space --
    _FINISHED_BEFORE = ("FROM fields f JOIN slides s ON s.id = f.slide_id"
                        " WHERE s.status = 'finished' AND s.finished_at < ?")

    # which column says a field still has each deletable image
    _IMAGE_FLAG = {"raw": "has_raw", "annotated": "has_annotated"}

    def _image_flag(self, kind: str) -> str:
        if kind not in self._IMAGE_FLAG:
            raise ValueError(f"no deletable image kind {kind!r}")
        return self._IMAGE_FLAG[kind]

    def count_images(self, kind: str, finished_before: datetime | None = None) -> int:
        """How many fields of finished slides (finished before that time, if given) keep their ``kind``
        image ("raw" frame or "annotated" field)."""
        cutoff = "9999" if finished_before is None else _utc_text(finished_before)
        return int(self._conn().execute(
            f"SELECT COUNT(*) {self._FINISHED_BEFORE} AND f.{self._image_flag(kind)} = 1", (cutoff,)).fetchone()[0])

    def image_fields(self, kind: str, finished_before: datetime | None) -> list[int]:
        """IDs of the fields of slides finished before that time (None: of every finished slide, those dated
        in the future by a clock that ran ahead too) that keep their ``kind`` image."""
        cutoff = "9999" if finished_before is None else _utc_text(finished_before)
        return [r[0] for r in self._conn().execute(
            f"SELECT f.id {self._FINISHED_BEFORE} AND f.{self._image_flag(kind)} = 1", (cutoff,))]

    def crop_files(self, field_ids: list[int]) -> list[tuple[int, Path]]:
        """(cell ID, crop path) of the cells with a review crop in these fields (the files may be missing)."""
        out: list[tuple[int, Path]] = []
        for chunk in _chunks(field_ids, 500):
            marks = ",".join("?" * len(chunk))
            out += [(cid, self._image_path(sid, key, f"cell{int(idx)}")) for cid, sid, key, idx in
                    self._conn().execute("SELECT c.id, f.slide_id, f.file_key, c.idx FROM cells c"
                                         " JOIN fields f ON f.id = c.field_id"
                                         f" WHERE c.has_crop = 1 AND c.field_id IN ({marks})", chunk)]
        return out

    def delete_images(self, kind: str, field_ids: list[int]) -> dict:
        """Delete the ``kind`` images ("raw" frames, the largest file of a field, or "annotated" fields) of
        these fields, where their slide is finished. The result, the cell list and the review crops
        are kept. What frees the SD card of a busy clinic.

        The rows stop naming the files first (one transaction), then the files go, each on its own: a
        file that cannot be deleted (a failing card) is counted and the others still go, and a run cut
        short leaves files no row names, which :meth:`sweep_images` deletes on the next run. Open
        slides are never touched. Returns ``{"fields", "bytes", "failed"}``.
        """
        flag = self._image_flag(kind)
        rows: list[tuple[int, int, str]] = []
        with self._tx() as c:
            for chunk in _chunks(field_ids, 500):
                marks = ",".join("?" * len(chunk))
                found = c.execute("SELECT f.id, f.slide_id, f.file_key FROM fields f JOIN slides s ON s.id = f.slide_id"
                                  f" WHERE s.status = 'finished' AND f.{flag} = 1 AND f.id IN ({marks})",
                                  chunk).fetchall()
                c.executemany(f"UPDATE fields SET {flag} = 0 WHERE id = ?", [(r[0],) for r in found])
                rows += [tuple(r) for r in found]
        freed, failed = self._unlink_images(kind, ((slide_id, key) for _, slide_id, key in rows))
        if rows:
            logger.info("deleted the %s images of %d fields (%.1f MB)%s", kind, len(rows), freed / 1e6,
                        f"; {failed} could not be deleted" if failed else "")
        return {"fields": len(rows), "bytes": freed, "failed": failed}

    def sweep_images(self, kind: str) -> dict:
        """Delete the ``kind`` image files of finished slides that no row names any more (what a Free space
        run cut short by a power cut or a failing card left). Returns ``{"files", "bytes", "failed"}``."""
        rows = self._conn().execute(
            "SELECT f.slide_id, f.file_key FROM fields f JOIN slides s ON s.id = f.slide_id"
            f" WHERE s.status = 'finished' AND f.{self._image_flag(kind)} = 0").fetchall()
        files = [(sid, key) for sid, key in rows if self._image_path(sid, key, kind).exists()]
        freed, failed = self._unlink_images(kind, files)
        if files:
            logger.warning("deleted %d %s images an interrupted Free space had left (%.1f MB)", len(files) - failed,
                           kind, freed / 1e6)
        return {"files": len(files) - failed, "bytes": freed, "failed": failed}

    def _unlink_images(self, kind: str, slide_keys) -> tuple[int, int]:
        freed = failed = 0
        for slide_id, key in slide_keys:
            path = self._image_path(slide_id, key, kind)
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed += 1
                logger.warning("%s image %s could not be deleted: %s", kind, path, exc)
        return freed, failed

    # -- files, by ID only --
    def _slide_dir(self, slide_id: int) -> Path:
        return self.images_dir / f"slide-{int(slide_id)}"

    def _image_path(self, slide_id: int, key: str, kind: str) -> Path:
        """A field's image: ``kind`` "annotated", "raw" or "cell<idx>" (the crop of a cell for review)."""
        return self._slide_dir(slide_id) / _image_name(key, kind)

    def field_image_path(self, field_id: int, kind: str) -> Path | None:
        """The annotated or raw image of a field, or None. ``kind`` is "annotated" or "raw"."""
        if kind not in ("annotated", "raw"):
            return None
        f = self.get_field(field_id)
        if f is None or not f[self._image_flag(kind)]:
            return None
        p = self._image_path(f["slide_id"], f["file_key"], kind)
        return p if p.is_file() else None

    def cell_crop_path(self, cell_id: int) -> Path | None:
        """Where the crop of a flagged cell or one near the threshold lives (it may be missing after a power
        cut), or None."""
        c = self.get_cell(cell_id)
        if c is None or not c["has_crop"]:
            return None
        return self._image_path(c["slide_id"], c["file_key"], f"cell{int(c['idx'])}")
