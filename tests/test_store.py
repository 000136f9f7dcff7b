"""Records: schema and migrations, WAL/FULL, files by ID, reviews, and durability across kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from device import store as store_mod
from device.analysis import CellVerdict, FieldResult
from device.store import Conflict, FieldImages, ModelInfo, NotFound, RecordsDamaged, Store, StoreError
from tests.conftest import ROOT, damage_a_page, wait_until

MODEL = ModelInfo("cellnet_int8", "a" * 64, 0.6, 0.001)
JPEG = b"\xff\xd8\xff\xe0fake-jpeg-bytes"


def _result(n_cells=20, n_infected=2, rejected=None) -> FieldResult:
    cells = [CellVerdict((10 * i, 5, 30, 30), 0.9 if i < n_infected else 0.1, i < n_infected)
             for i in range(n_cells)]
    return FieldResult(1600, 1200, rejected, [] if rejected else cells, 120.0, 0.6, {"total_ms": 250.0})


def _images(result: FieldResult, raw=True) -> FieldImages:
    return FieldImages(JPEG + b"annotated", JPEG + b"raw" if raw else None,
                       {i: JPEG + bytes([i]) for i, c in enumerate(result.cells) if c.infected})


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


def _slide(store, sample="S-1", **kw) -> int:
    return store.create_slide(sample_id=sample, model=MODEL, target_rbc=2000, rbc_per_ul=5e6, **kw)


def add_fields(store, slide_id: int, model_sha256: str = MODEL.sha256, n: int = 10) -> None:
    """``n`` fields of 80 cells each: enough cell rows to fill several pages of the cells table."""
    for _ in range(n):
        result = _result(n_cells=80)
        store.add_field(slide_id, result, source="camera", model_sha256=model_sha256, images=_images(result))


def test_new_database_is_wal_full_at_the_latest_schema(store, tmp_path):
    assert store.pragma("user_version") == store_mod.SCHEMA_VERSION == len(store_mod.MIGRATIONS)
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL: each commit fsyncs the WAL
    assert store.pragma("foreign_keys") == 1
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700


def test_reopening_does_not_migrate_again_and_keeps_data(tmp_path):
    s = Store(tmp_path)
    sid = _slide(s)
    s.close()
    s2 = Store(tmp_path)
    assert s2.get_slide(sid)["sample_id"] == "S-1"
    s2.close()


def test_slides_amended_after_finish_before_the_upgrade_say_so_after_it(tmp_path, monkeypatch):
    """Migration 11 counts review changes after Finish from then on; a slide amended under the software before it
    carries the evidence in its cells' dates (reviewed after the slide was finished): counted too."""
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:10])
    old = Store(tmp_path)
    with old._tx() as c:
        def slide(status, finished_at):
            return c.execute(
                "INSERT INTO slides (sample_id, status, started_at, finished_at, model_name, model_sha256, threshold,"
                " fp_rate_per_cell, target_rbc, rbc_per_ul) VALUES (?, ?, '2026-11-01T08:00:00+00:00', ?, ?, ?, ?, ?,"
                " 2000, 5e6)", (f"S-{status}", status, finished_at, MODEL.name, MODEL.sha256, MODEL.threshold,
                               MODEL.fp_rate_per_cell)).lastrowid

        amended = slide("finished", "2026-11-01T09:00:00+00:00")
        clean = slide("finished", "2026-11-01T09:00:00+00:00")
        still_open = slide("open", None)
        for sid in (amended, clean, still_open):
            fid = c.execute(
                "INSERT INTO fields (slide_id, seq, captured_at, source, width, height, focus, rbc_count,"
                " infected_count, model_sha256, threshold, timing_json, file_key, has_raw) VALUES (?, 1,"
                " '2026-11-01T08:01:00+00:00', 'camera', 1600, 1200, 3.0, 20, 3, ?, 0.6, '{}', ?, 1)",
                (sid, MODEL.sha256, f"k{sid}")).lastrowid
            dates = (["2026-11-01T08:30:00+00:00", "2026-11-02T10:00:00+00:00", "2026-11-03T11:00:00+00:00"]
                     if sid != clean else ["2026-11-01T08:30:00+00:00", None, None])
            c.executemany("INSERT INTO cells (field_id, idx, x, y, w, h, p_infected, infected, has_crop, review,"
                          " reviewed_at) VALUES (?, ?, 0, 0, 30, 30, 0.99, 1, 0, ?, ?)",
                          [(fid, i, "rejected" if d else None, d) for i, d in enumerate(dates)])
    old.close()
    monkeypatch.undo()
    new = Store(tmp_path)
    try:
        got = {sid: (new.get_slide(sid)["review_changes_after_finish"],
                     new.get_slide(sid)["last_review_change_after_finish_at"]) for sid in (amended, clean, still_open)}
        assert got == {amended: (2, "2026-11-03T11:00:00+00:00"), clean: (0, None), still_open: (0, None)}
    finally:
        new.close()


def test_a_database_of_the_first_schema_upgrades_with_its_records(tmp_path, monkeypatch):
    """A device updated in the field opens its version-1 records: the counted views (2), field
    exclusion (3), clock confirmations (4), deletable annotated images (5) and discarded slides (6, 7)
    are added, and every slide, field, cell and image is still there and counts as before."""
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    old = Store(tmp_path)
    with old._tx() as c:  # the rows as the first software wrote them (today's code needs table 6)
        sid = c.execute(
            "INSERT INTO slides (sample_id, started_at, model_name, model_sha256, threshold, fp_rate_per_cell,"
            " target_rbc, rbc_per_ul) VALUES ('S-1', '2026-11-01T08:00:00+00:00', ?, ?, ?, ?, 2000, 5e6)",
            (MODEL.name, MODEL.sha256, MODEL.threshold, MODEL.fp_rate_per_cell)).lastrowid
        # its field and cells as the first software wrote them: 20 cells, 2 flagged, an annotated image
        fid = c.execute(
            "INSERT INTO fields (slide_id, seq, captured_at, source, width, height, focus, rbc_count,"
            " infected_count, model_sha256, threshold, timing_json, file_key, has_raw)"
            " VALUES (?, 1, '2026-11-01T08:01:00+00:00', 'camera', 1600, 1200, 120.0, 20, 2, ?, 0.6, '{}',"
            " 'k1', 1)", (sid, MODEL.sha256)).lastrowid
        c.executemany("INSERT INTO cells (field_id, idx, x, y, w, h, p_infected, infected, has_crop)"
                      " VALUES (?, ?, ?, 5, 30, 30, ?, ?, ?)",
                      [(fid, i, 10 * i, 0.9 if i < 2 else 0.1, int(i < 2), int(i < 2)) for i in range(20)])
    (tmp_path / "images" / f"slide-{sid}").mkdir(parents=True)
    (tmp_path / "images" / f"slide-{sid}" / "k1_annotated.jpg").write_bytes(JPEG + b"annotated")
    assert old.pragma("user_version") == 1
    old.close()
    monkeypatch.undo()
    new = Store(tmp_path)
    try:
        assert new.pragma("user_version") == store_mod.SCHEMA_VERSION == 11
        # a slide finished before review changes after Finish were counted has none (11)
        assert new.get_slide(sid)["review_changes_after_finish"] == 0
        assert new.get_slide(sid)["last_review_change_after_finish_at"] is None
        # a slide started before cells near the threshold were shown has none (9)
        assert new.get_slide(sid)["review_floor"] is None and new.near_cells(sid) == []
        assert new.totals(sid)["near"] == {"cells": 0, "confirmed": 0, "rejected": 0, "pending": 0}
        assert new.get_field(fid)["has_annotated"] == 1 and new.field_image_path(fid, "annotated").is_file()
        assert new.newest_record_time() is not None  # the clock check reads the new table on old records
        new.confirm_clock()
        assert new.newest_record_time() is None
        after = new.totals(sid)
        assert (after["fields"], after["fields_used"], after["rbc_count"], after["infected_count"]) == (1, 1, 20, 2)
        assert after["fields_excluded"] == 0 and after["review"] == {"confirmed": 0, "rejected": 0, "pending": 2}
        assert new.get_field(fid)["excluded"] is None and new.counted_views_png(sid) == {}
        assert len(new.flagged_cells(sid)) == 2
        new.exclude_field(fid, "other")  # the new columns work on old rows
        assert _slide(new, "S-2") == sid + 1  # and a new slide gets the next number, a new field too
        assert new.add_field(sid + 1, _result(), source="camera", model_sha256=MODEL.sha256,
                             images=_images(_result())) == fid + 1
        assert new.totals(sid)["rbc_count"] == 0
    finally:
        new.close()


def test_a_new_migration_runs_once_in_order(tmp_path, monkeypatch):
    s = Store(tmp_path)
    sid = _slide(s)
    s.close()
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, "ALTER TABLE slides ADD COLUMN stain TEXT;"])
    s2 = Store(tmp_path)
    assert s2.pragma("user_version") == len(store_mod.MIGRATIONS)
    assert s2.get_slide(sid)["stain"] is None and s2.get_slide(sid)["sample_id"] == "S-1"
    s2.close()


def test_a_failing_migration_rolls_back_and_keeps_the_version(tmp_path, monkeypatch):
    Store(tmp_path).close()
    good = len(store_mod.MIGRATIONS)
    monkeypatch.setattr(store_mod, "MIGRATIONS", [
        *store_mod.MIGRATIONS, "ALTER TABLE slides ADD COLUMN a TEXT; ALTER TABLE no_such_table ADD COLUMN b;"])
    with pytest.raises(StoreError, match=f"migration {good + 1} failed"):
        Store(tmp_path)
    conn = sqlite3.connect(tmp_path / store_mod.DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == good
    assert "a" not in [r[1] for r in conn.execute("PRAGMA table_info(slides)")]
    conn.close()


def test_a_database_from_newer_software_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / store_mod.DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer than this software"):
        Store(tmp_path)


def test_a_corrupt_database_file_is_a_store_error(tmp_path):
    (tmp_path / store_mod.DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable database"):
        Store(tmp_path)


def test_a_database_with_damaged_table_pages_is_a_store_error(tmp_path):
    s = Store(tmp_path)
    for i in range(300):  # enough rows for the slides table to fill many pages
        _slide(s, sample=f"S{i:03d}" * 20, notes="x" * 500)
    s._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    with open(tmp_path / store_mod.DB_NAME, "r+b") as fh:  # header and schema intact, table pages not
        fh.seek(4096 * 3)
        fh.write(bytes(range(256)) * 16 * 20)
    with pytest.raises(StoreError, match="not a usable database .*malformed.*restore a backup"):
        Store(tmp_path)  # was a raw sqlite3.DatabaseError: a traceback, not the service's one-line error


def test_a_damaged_page_start_up_does_not_read_is_found_by_the_integrity_check(tmp_path):
    """Opening the records reads their header, schema and open slides: a cells page of a finished slide
    damaged by the card passed start-up, and new slides were written into the damaged file. The check
    the service runs after start-up reads every page; from then on writes are refused, reads go on."""
    s = Store(tmp_path)
    assert s.check_integrity() is None and s.damage is None  # intact records: nothing said
    sid = _slide(s)
    add_fields(s, sid)
    s.finish_slide(sid, lambda slide, totals: {})
    damage_a_page(s, "cells")
    s = Store(tmp_path)  # start-up does not read that page
    try:
        assert s.damage is None
        found = s.check_integrity()
        assert found and "malformed" in found and s.damage == found
        with pytest.raises(RecordsDamaged, match="damaged"):
            _slide(s, sample="S-2")
        assert s.get_slide(sid)["status"] == "finished"  # what can still be read is
        assert [r["sample_id"] for r in s.list_slides()] == ["S-1"]
    finally:
        s.close()


# A card failing a read: read(2)/pread(2) of the records' bytes at BAD_OFFSET fail with EIO (LD_PRELOAD).
_EIO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int bad(int fd, off_t off, size_t n) {
    const char *o = getenv("BAD_OFFSET"); char p[64], t[4096]; ssize_t k;
    if (!o || off > atoll(o) || off + (off_t)n <= atoll(o)) return 0;
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    k = readlink(p, t, sizeof t - 1);
    if (k <= 0) return 0;
    t[k] = 0;
    k = strlen(t);
    return k > 22 && strcmp(t + k - 22, "malaria-detect.sqlite3") == 0;
}
ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    if (bad(fd, off, n)) { errno = EIO; return -1; }
    return real(fd, buf, n, off);
}
ssize_t read(int fd, void *buf, size_t n) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "read");
    if (bad(fd, lseek(fd, 0, SEEK_CUR), n)) { errno = EIO; return -1; }
    return real(fd, buf, n);
}
"""


def test_a_card_failing_a_read_is_not_called_damage(tmp_path):
    """SQLite 3.40 reports a read that failed with EIO as "database disk image is malformed": a failing card
    was called damaged records at start-up ("move it aside and restore a backup") and in the check. The
    records' own bytes are read to tell the two apart. A real EIO from the C library (a preloaded shim)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the read-error shim")
    shim = tmp_path / "eio.so"
    (tmp_path / "eio.c").write_text(_EIO_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(shim), str(tmp_path / "eio.c"), "-ldl"], check=True)
    data = tmp_path / "data"
    s = Store(data)
    sid = _slide(s)
    add_fields(s, sid)
    s.finish_slide(sid, lambda slide, totals: {})
    conn = s._conn()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    cells = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = 'cells' AND pagetype = 'leaf' "
                                        "ORDER BY pageno")]
    s.close()
    before = (data / store_mod.DB_NAME).read_bytes()
    probe = textwrap.dedent(f"""
        import json, sys
        from device.store import Store, StoreError
        try:
            s = Store({str(data)!r})
        except StoreError as exc:
            print(json.dumps({{"start": str(exc)}}))
            sys.exit()
        print(json.dumps({{"start": None, "check": s.check_integrity()}}))
        s.close()
    """)

    def run(bad_page: int) -> dict:
        env = {**os.environ, "LD_PRELOAD": str(shim), "BAD_OFFSET": str((bad_page - 1) * page_size + 100)}
        r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    later = run(cells[len(cells) // 2])  # a page start-up does not read: found by the check
    assert later["start"] is None
    assert later["check"].startswith("the card failed a read (Input/output error)"), later
    early = run(2)  # a page start-up reads (the schema)
    said = early["start"]
    assert said and "failed a read" in said and "Input/output error" in said, said
    assert "not a usable database" not in said and "Do not restore a backup" in said
    assert (data / store_mod.DB_NAME).read_bytes() == before  # nothing written into the records
    s = Store(data)  # the card reads again: every record is there
    assert s.get_slide(sid)["status"] == "finished" and s.check_integrity() is None
    s.close()


def test_records_on_a_card_that_turned_read_only_are_not_called_damaged(tmp_path):
    """A failing SD card is remounted read-only and stays so after a reboot: SQLite cannot open the records
    in WAL mode, and the service called the intact records "not a usable database", advising to restore a
    backup over them (every record since that backup lost). A real read-only file system when this runs
    as root and may mount one; otherwise a folder this user cannot write, which SQLite meets the same way."""
    card = tmp_path / "card"
    card.mkdir()
    as_root = os.geteuid() == 0
    if as_root and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(card)],
                                  capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount a file system: no read-only folder to test on")
    try:
        s = Store(card / "data")
        sid = _slide(s)
        s.close()
        if as_root:
            if subprocess.run(["mount", "-o", "remount,ro", str(card)], capture_output=True).returncode != 0:
                pytest.skip("running as root without the right to mount a file system read-only: nothing to test on")
        else:
            os.chmod(card / "data", 0o500)
        with pytest.raises(StoreError) as err:
            Store(card / "data")
        said = str(err.value)
        assert "not a usable database" not in said and "not damaged" in said and "do not restore a backup" in said
        assert ("Read-only file system" if as_root else "Permission denied") in said
        if as_root:
            subprocess.run(["mount", "-o", "remount,rw", str(card)], check=True)
        else:
            os.chmod(card / "data", 0o700)
        s = Store(card / "data")  # writable again: every record is there
        assert s.get_slide(sid)["sample_id"] == "S-1"
        s.close()
    finally:
        busy = as_root and subprocess.run(["umount", str(card)], capture_output=True).returncode != 0
        if busy:
            subprocess.run(["umount", "-l", str(card)], check=False)
        if not as_root:
            os.chmod(card / "data", 0o700)
    assert not busy, "a file on the card was left open (the failed start kept a connection, and the card busy)"


def test_records_on_a_full_card_are_not_called_damaged(tmp_path):
    """A card filled to the last block (a copy left on it, logs): SQLite fails opening the records with
    "disk I/O error", and the service said "not a usable database ... restore a backup", sending the admin
    to replace intact records with older ones. A real full file system: a small tmpfs, mounted as root."""
    if os.geteuid() != 0:
        pytest.skip("only root can mount a small file system to fill")
    card = tmp_path / "card"
    card.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(card)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount a file system: no card to fill")
    try:
        s = Store(card / "data")
        sid = _slide(s)
        s.close()
        with open(card / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            for size in (65536, 512, 1):  # to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"\0" * size)
        assert shutil.disk_usage(card).free < 4096
        with pytest.raises(StoreError) as err:
            Store(card / "data")
        said = str(err.value)
        assert "card is full" in said and "do not restore a backup" in said
        assert "not a usable database" not in said and "restore a backup\n" not in said
        (card / "filler").unlink()
        s = Store(card / "data")  # room again: every record is there
        assert s.get_slide(sid)["sample_id"] == "S-1"
        s.close()
    finally:
        busy = subprocess.run(["umount", str(card)], capture_output=True).returncode != 0
        if busy:
            subprocess.run(["umount", "-l", str(card)], check=False)
    assert not busy, "a file on the card was left open (the failed start kept a connection, and the card busy)"


@pytest.mark.parametrize("failure", ["slide finished meanwhile", "disk full"])
def test_a_field_that_cannot_be_recorded_leaves_no_image_behind(store, monkeypatch, failure):
    sid = _slide(store)
    res = _result()
    real_fsync, real_write = store_mod.fsync_dir, store_mod.write_atomic
    if failure == "slide finished meanwhile":  # the technician finishes while the images are written
        def fsync_then_finish(folder):
            real_fsync(folder)
            store.finish_slide(sid, lambda slide, totals: {})
        monkeypatch.setattr(store_mod, "fsync_dir", fsync_then_finish)
        expected = Conflict
    else:
        def write_until_full(path, data, **kw):
            if "_raw" in path.name:
                raise OSError(28, "No space left on device")
            real_write(path, data, **kw)
        monkeypatch.setattr(store_mod, "write_atomic", write_until_full)
        expected = OSError
    with pytest.raises(expected):
        store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    assert store.list_fields(sid) == []
    assert not [p for p in store.images_dir.rglob("*") if p.is_file()]  # the annotated copy was removed too


def test_field_images_written_atomically_and_found_by_id(store):
    sid = _slide(store)
    res = _result()
    fid = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    f = store.get_field(fid)
    assert f["seq"] == 1 and f["rbc_count"] == 20 and f["infected_count"] == 2
    assert f["model_sha256"] == MODEL.sha256 and f["threshold"] == 0.6
    ann = store.field_image_path(fid, "annotated")
    assert ann.read_bytes() == JPEG + b"annotated"
    assert stat.S_IMODE(ann.stat().st_mode) == 0o600
    assert store.field_image_path(fid, "raw").read_bytes() == JPEG + b"raw"
    assert store.field_image_path(fid, "../../etc/passwd") is None
    assert store.field_image_path(999, "annotated") is None
    assert not list(store.images_dir.rglob("*.tmp"))  # no temp file left behind
    flagged = store.flagged_cells(sid)
    assert [c["idx"] for c in flagged] == [0, 1] and all(c["has_crop"] for c in flagged)
    assert store.cell_crop_path(flagged[0]["id"]).read_bytes() == JPEG + bytes([0])
    assert len(store.field_cells(fid)) == 20


def test_totals_count_used_fields_and_reviews(store):
    sid = _slide(store)
    for res in (_result(20, 2), _result(30, 1), _result(rejected="out of focus")):
        store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    t = store.totals(sid)
    assert (t["fields"], t["fields_used"], t["fields_rejected"]) == (3, 2, 1)
    assert (t["rbc_count"], t["infected_count"]) == (50, 3)
    cells = store.flagged_cells(sid)
    store.review_cell(cells[0]["id"], "confirmed", by="tech")
    store.review_cell(cells[1]["id"], "rejected")
    t = store.totals(sid)
    assert t["review"] == {"confirmed": 1, "rejected": 1, "pending": 1}
    assert t["reviewed_infected_count"] == 2 and t["infected_count"] == 3  # both kept
    assert store.get_cell(cells[1]["id"])["p_infected"] == 0.9  # the model's verdict stays
    store.review_cell(cells[1]["id"], None)
    assert store.totals(sid)["review"]["pending"] == 2
    with pytest.raises(ValueError):
        store.review_cell(cells[0]["id"], "maybe")
    with pytest.raises(NotFound):
        store.review_cell(12345, "confirmed")
    unflagged = [c for c in store.field_cells(cells[0]["field_id"]) if not c["infected"]][0]
    with pytest.raises(Conflict):
        store.review_cell(unflagged["id"], "confirmed")


def test_cells_near_the_threshold_are_reviewed_beside_the_flagged_ones(store):
    """A slide started with a review floor lists its unflagged cells scored from the floor up (highest
    first) for review; one confirmed adds a parasite to the count after review. Cells below the floor,
    and every cell of a slide started without a floor, take no decision."""
    sid, before = _slide(store, review_floor=0.5), _slide(store, "S-0")
    scores = [0.9, 0.55, 0.1, 0.95, 0.5, 0.49, 0.58]  # threshold 0.6: 2 flagged, 3 near (0.58, 0.55, 0.5)
    cells = [CellVerdict((10 * i, 5, 30, 30), p, p >= 0.6) for i, p in enumerate(scores)]
    for slide_id in (sid, before):
        res = FieldResult(1600, 1200, None, cells, 120.0, 0.6, {"total_ms": 1.0})
        store.add_field(slide_id, res, source="camera", model_sha256=MODEL.sha256,
                        images=FieldImages(JPEG, None, {i: JPEG for i, p in enumerate(scores) if p >= 0.5}))
    near = store.near_cells(sid)
    assert [c["p_infected"] for c in near] == [0.58, 0.55, 0.5] and all(c["has_crop"] for c in near)
    assert [c["p_infected"] for c in store.flagged_cells(sid)] == [0.9, 0.95]
    t = store.totals(sid)
    assert t["near"] == {"cells": 3, "confirmed": 0, "rejected": 0, "pending": 3}
    assert t["review"]["pending"] == 2 and t["reviewed_infected_count"] == 2  # not counted until confirmed
    store.review_cell(near[0]["id"], "confirmed", by="tech")
    store.review_cell(near[1]["id"], "rejected")
    t = store.totals(sid)
    assert t["near"] == {"cells": 3, "confirmed": 1, "rejected": 1, "pending": 1}
    assert t["reviewed_infected_count"] == 3 and t["infected_count"] == 2  # the automatic count stays
    assert t["review"] == {"confirmed": 0, "rejected": 0, "pending": 2}  # the flagged cells' own review
    below = [c for c in store.field_cells(near[0]["field_id"]) if c["p_infected"] < 0.5][0]
    with pytest.raises(Conflict, match="near the threshold"):
        store.review_cell(below["id"], "confirmed")
    old = [c for c in store.field_cells(store.list_fields(before)[0]["id"]) if c["p_infected"] == 0.58][0]
    assert store.near_cells(before) == [] and store.totals(before)["near"]["cells"] == 0
    with pytest.raises(Conflict):
        store.review_cell(old["id"], "confirmed")
    for bad in (0.0, 0.3, 1.5, float("nan")):  # below 0.5: outside the config's range and the index
        with pytest.raises(ValueError, match="review floor"):
            _slide(store, f"S-{bad}", review_floor=bad)


def test_cells_near_the_threshold_are_read_through_their_small_index(store):
    """The near-threshold counts and gallery read the partial index of unflagged cells scored from 0.5
    (cells_near), not every cell of the slide. Its predecessor (cells_unflagged) held every unflagged cell:
    a third of the database."""
    sid = _slide(store, review_floor=0.7)
    scores = [0.9, 0.55, 0.1, 0.95, 0.5, 0.49, 0.75, 0.02, 0.3]  # threshold 0.8: 2 flagged, 1 near (0.75)
    res = FieldResult(1600, 1200, None, [CellVerdict((10 * i, 5, 30, 30), p, p >= 0.8) for i, p in enumerate(scores)],
                      120.0, 0.8, {"total_ms": 1.0})
    store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=FieldImages(JPEG, None, {}))
    conn = store._conn()
    statements = []
    conn.set_trace_callback(statements.append)
    try:
        assert store.totals(sid)["near"]["cells"] == 1 and [c["p_infected"] for c in store.near_cells(sid)] == [0.75]
    finally:
        conn.set_trace_callback(None)
    near_reads = [q for q in statements if "review_floor" in q and q.lstrip().upper().startswith("SELECT")]
    assert len(near_reads) == 2, statements
    for q in near_reads:
        plan = " ".join(r["detail"] for r in conn.execute("EXPLAIN QUERY PLAN " + q))
        assert "USING INDEX cells_near" in plan, (q, plan)
    indexes = dict(conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'cells'"
                                " AND sql IS NOT NULL").fetchall())
    assert set(indexes) == {"cells_flagged", "cells_near"}
    assert indexes["cells_near"].endswith("WHERE infected = 0 AND p_infected >= 0.5")


def test_totals_read_one_snapshot(store, tmp_path, monkeypatch):
    """The counts and the reviews are read in one snapshot: a field counted again by another window between
    two reads gave 2 confirmed cells beside 0 infected ones, and summarize_slide raised (a 500 on the page)."""
    sid = _slide(store)
    res = _result(20, 2)
    fid = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    for cell in store.flagged_cells(sid):
        store.review_cell(cell["id"], "confirmed")
    store.exclude_field(fid, "other")
    other = Store(tmp_path / "data")  # another thread's connection, as another request has
    real = store._conn()
    reads = []

    class Between:  # counts the field again between the first read of totals() and the next
        def execute(self, sql, *args):
            out = real.execute(sql, *args)
            if sql.lstrip().upper().startswith("SELECT"):
                reads.append(sql)
                if len(reads) == 1:
                    other.exclude_field(fid, None)
            return out

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(store, "_conn", lambda: Between())
    try:
        t = store.totals(sid)
    finally:
        other.close()
    assert len(reads) >= 2
    assert (t["rbc_count"], t["infected_count"], t["review"]["confirmed"]) == (0, 0, 0)  # all before the change
    monkeypatch.undo()
    t = store.totals(sid)
    assert (t["rbc_count"], t["infected_count"], t["review"]["confirmed"]) == (20, 2, 2)  # all after it


def test_a_field_committed_while_finishing_is_in_the_result_or_refused_never_lost(store):
    """Finish reads the counts inside the write lock: a field that arrives meanwhile waits, then is
    refused. (Counts read before the lock once stored 1 field's result beside 2 recorded fields.)"""
    import threading

    sid = _slide(store)
    res = _result(n_cells=30, n_infected=3)
    store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    late: dict = {}

    def add_late():
        try:
            late["id"] = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
        except Conflict as exc:
            late["error"] = exc

    def result(slide, totals):
        t = threading.Thread(target=add_late)
        t.start()
        t.join(0.5)
        late["blocked"] = t.is_alive()  # the late field waits for the finish to commit
        late["thread"] = t
        return {"automatic": {"rbc_count": totals["rbc_count"]}}

    done = store.finish_slide(sid, result)
    late["thread"].join(10)
    assert late["blocked"] and "error" in late and "id" not in late
    assert json.loads(done["result_json"])["automatic"]["rbc_count"] == store.totals(sid)["rbc_count"] == 30


def test_finished_slides_and_other_models_refuse_fields(store):
    sid = _slide(store)
    res = _result()
    with pytest.raises(Conflict, match="another model"):
        store.add_field(sid, res, source="camera", model_sha256="b" * 64, images=_images(res))
    store.finish_slide(sid, lambda slide, totals: {"automatic": {"call": "negative"}})
    assert store.get_slide(sid)["status"] == "finished"
    with pytest.raises(Conflict, match="finished"):
        store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    with pytest.raises(Conflict):
        store.finish_slide(sid, lambda slide, totals: {})
    with pytest.raises(NotFound):
        store.finish_slide(999, lambda slide, totals: {})
    with pytest.raises(ValueError):
        _slide(store, sample="   ")


def test_search_by_sample_id_treats_wildcards_literally(store):
    for s in ("ABC-1", "ABC-2", "X_1", "X%1", "other"):
        _slide(store, sample=s)
    assert [s["sample_id"] for s in store.list_slides("abc")] == ["ABC-2", "ABC-1"]
    assert [s["sample_id"] for s in store.list_slides("_")] == ["X_1"]
    assert [s["sample_id"] for s in store.list_slides("%")] == ["X%1"]
    assert len(store.list_slides("")) == 5
    assert len(store.list_slides(status="open", limit=2)) == 2


def test_lost_crop_is_cut_again_from_the_raw_frame(store, tmp_path):
    import cv2
    import numpy as np

    from device.service import ensure_crop

    sid = _slide(store)
    res = _result()
    rgb = np.zeros((1200, 1600, 3), np.uint8)
    rgb[:, :, 0] = 200
    raw = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    images = FieldImages(JPEG, raw, {0: JPEG, 1: JPEG})
    store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=images)
    cell = store.flagged_cells(sid)[0]
    path = store.cell_crop_path(cell["id"])
    path.write_bytes(b"")  # what a power cut can leave of a crop renamed without fsync
    assert ensure_crop(store, cell["id"]) == path
    crop = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape[0] > 30 and crop[..., 2].mean() > 150  # red, from the raw frame
    path.unlink()
    assert ensure_crop(store, cell["id"]) == path and path.stat().st_size > 0


WRITER = textwrap.dedent("""
    import sys
    from device.analysis import CellVerdict, FieldResult
    from device.store import FieldImages, ModelInfo, Store
    store = Store(sys.argv[1])
    model = ModelInfo("m", "a" * 64, 0.6, 0.0)
    sid = store.create_slide(sample_id="kill-9", model=model, target_rbc=2000, rbc_per_ul=5e6)
    cells = [CellVerdict((i, i, 20, 20), 0.9, True) for i in range(3)]
    res = FieldResult(64, 48, None, cells, 100.0, 0.6, {})
    n = 0
    while True:
        fid = store.add_field(sid, res, source="camera", model_sha256=model.sha256,
                              images=FieldImages(b"A" * 50000, b"R" * 80000, {0: b"c", 1: b"c", 2: b"c"}))
        print(fid, flush=True)  # the acknowledgement: sent only after the commit
""")


def test_acknowledged_fields_survive_kill_9(tmp_path):
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked = []
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 15:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-write of the next field, most likely
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL and len(acked) >= 15
    s = Store(data)
    try:
        for fid in acked:
            f = s.get_field(fid)
            assert f is not None, f"acknowledged field {fid} lost"
            assert s.field_image_path(fid, "annotated").read_bytes() == b"A" * 50000
            assert s.field_image_path(fid, "raw").read_bytes() == b"R" * 80000
        assert s.pragma("integrity_check") == "ok"
    finally:
        s.close()


def test_start_up_removes_what_a_cut_short_write_left_in_open_slides_only(tmp_path):
    s = Store(tmp_path)
    open_id, done_id = _slide(s, "OPEN"), _slide(s, "DONE")
    res = _result()
    fid = s.add_field(open_id, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    key = s.get_field(fid)["file_key"]
    s.finish_slide(done_id, lambda slide, totals: {})
    s.close()
    open_dir, done_dir = tmp_path / "images" / f"slide-{open_id}", tmp_path / "images" / f"slide-{done_id}"
    done_dir.mkdir()
    left = [open_dir / "0123456789abcdef_annotated.jpg", open_dir / "0123456789abcdef_raw.jpg",
            open_dir / ".0123456789abcdef_cell0.jpg.x1y2.tmp"]
    untouched = [done_dir / "fedcba9876543210_annotated.jpg", open_dir / "00000000000000aa_annotated.jpg"]
    old = time.time() - store_mod.STALE_TEMP_S - 5
    for p in left + untouched:
        p.write_bytes(b"x")
        if p != untouched[1]:  # that one is being written right now, by another process
            os.utime(p, (old, old))
    s = Store(tmp_path)
    try:
        assert s.interrupted_files_removed == len(left)
        assert not any(p.exists() for p in left) and all(p.exists() for p in untouched)
        assert s.field_image_path(fid, "annotated").name == f"{key}_annotated.jpg"  # the stored field keeps its files
        assert s.cell_crop_path(s.flagged_cells(open_id)[0]["id"]).is_file()
    finally:
        s.close()


def test_what_a_crash_left_goes_when_the_slide_is_finished_and_a_discarded_slides_folder_at_start_up(tmp_path):
    """Files a crash left were kept at start-up when young (the service restarts within seconds) or dated
    ahead (a Pi whose clock came back behind) and nothing looked again once the slide was finished: 40
    kills left 141 files (13.8 MB). A crash between a discard's commit and its folder's removal kept the
    folder for good."""
    s = Store(tmp_path)
    sid = _slide(s, "OPEN")
    res = _result()
    fid = s.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    folder = tmp_path / "images" / f"slide-{sid}"
    young, ahead = folder / "0123456789abcdef_annotated.jpg", folder / "0123456789abcdef_raw.jpg"
    young.write_bytes(b"x")
    ahead.write_bytes(b"x")
    later = time.time() + 45 * 60
    os.utime(ahead, (later, later))
    gone = _slide(s, "GONE")
    s.discard_slide(gone)
    s.close()
    (tmp_path / "images" / f"slide-{gone}").mkdir()  # the folder a crash left after the discard's commit
    (tmp_path / "images" / f"slide-{gone}" / "0123456789abcdef_raw.jpg").write_bytes(b"x")
    s = Store(tmp_path)
    try:
        assert young.exists() and ahead.exists()  # possibly a write in progress: kept at start-up
        assert not (tmp_path / "images" / f"slide-{gone}").exists()
        s.finish_slide(sid, lambda slide, totals: {})
        assert not young.exists() and not ahead.exists()
        assert s.field_image_path(fid, "annotated").is_file() and s.field_image_path(fid, "raw").is_file()
        assert s.cell_crop_path(s.flagged_cells(sid)[0]["id"]).is_file()
    finally:
        s.close()


def test_one_open_slide_per_sample_even_when_two_starts_race(store):
    """The check ran before the insert, outside the write lock: two starts at once made two open slides."""
    import threading

    results: list = []

    def start():
        try:
            results.append(_slide(store, sample="RACE-1"))
        except Conflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(isinstance(r, int) for r in results) == 1 and sum(isinstance(r, Conflict) for r in results) == 3
    with pytest.raises(Conflict, match="^slide RACE-1 is already open"):
        _slide(store, sample="race-1")  # the same sample in other letters: named as recorded
    _slide(store, sample="Échantillon-1")
    with pytest.raises(Conflict, match="already open"):
        _slide(store, sample="échantillon-1")  # beyond A-Z too (SQLite's lower() folds A-Z only)
    # look-alikes that read the same on screen: É as E + combining accent (NFD), full-width letters
    import unicodedata

    with pytest.raises(Conflict, match="already open"):
        _slide(store, sample=unicodedata.normalize("NFD", "Échantillon-1"))
    with pytest.raises(Conflict, match="already open"):
        _slide(store, sample="ＲＡＣＥ-1")
    # stored in one form (NFC), and searched as the open-slide rule compares: typed either way, in any
    # case (beyond A-Z too), or in full-width letters, a search finds the slide it would refuse beside
    for typed in (unicodedata.normalize("NFD", "Échant"), "échant", "ÉCHANT", "ｅｃｈａｎｔ".replace("ｅ", "é", 1)):
        assert [r["sample_id"] for r in store.list_slides(typed)] == ["Échantillon-1"], typed
    assert [r["sample_id"] for r in store.list_slides("ＲＡＣＥ")] == ["RACE-1"]
    assert len(store.list_slides("a", limit=1)) == 1 and store.list_slides("a", limit=1, offset=5) == []
    sid = next(r for r in results if isinstance(r, int))
    store.finish_slide(sid, lambda slide, totals: {})
    assert _slide(store, sample="RACE-1")  # once finished, the sample may be started again


def test_newest_record_time_is_the_latest_slide_or_field_time(store, monkeypatch):
    from datetime import UTC, datetime

    assert store.newest_record_time() is None  # a new device: nothing to compare the clock with
    clock = iter(["2026-12-01T08:00:00+00:00", "2026-12-01T08:05:00+00:00", "2026-12-01T08:09:30+00:00"])
    monkeypatch.setattr(store_mod, "utc_now", lambda: next(clock))
    sid = _slide(store)
    assert store.newest_record_time() == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    res = _result()
    store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    assert store.newest_record_time() == datetime(2026, 12, 1, 8, 5, tzinfo=UTC)
    store.finish_slide(sid, lambda slide, totals: {"call": "negative"})
    assert store.newest_record_time() == datetime(2026, 12, 1, 8, 9, 30, tzinfo=UTC)


def test_a_backup_taken_while_fields_are_written_is_whole_and_restores(store, tmp_path):
    import threading

    sid = _slide(store)
    store.add_field(sid, _result(), source="camera", model_sha256=MODEL.sha256, images=_images(_result()))
    stop = threading.Event()

    def capture_fields():  # the technician keeps counting while the admin downloads a backup
        while not stop.is_set():
            res = _result(n_cells=37, n_infected=3)
            store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))

    writer = threading.Thread(target=capture_fields)
    writer.start()
    try:
        copies = []
        for i in range(4):
            seen = len(store.list_fields(sid))
            assert wait_until(lambda seen=seen: len(store.list_fields(sid)) > seen, 10), "no field was written"
            info = store.backup(tmp_path / f"copy{i}.sqlite")
            copies.append((tmp_path / f"copy{i}.sqlite", info))
    finally:
        stop.set()
        writer.join()
    for path, info in copies:
        assert not path.with_name(f".{path.name}.tmp").exists()
        assert path.read_bytes()[:16] == b"SQLite format 3\x00" and info["bytes"] == path.stat().st_size
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, no -wal needed
            assert info["fields"] == db.execute("SELECT COUNT(*) FROM fields").fetchone()[0] >= 1
            # every field in the copy is whole: all of its cells are there
            rows = db.execute("SELECT f.rbc_count, COUNT(c.id) FROM fields f LEFT JOIN cells c ON c.field_id = f.id"
                              " GROUP BY f.id").fetchall()
            assert all(n == cells for n, cells in rows), rows
        finally:
            db.close()
    # restore (systemd/README.md): the copy under the database's name in a data folder
    last, info = copies[-1]
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    os.replace(last, restored_dir / store_mod.DB_NAME)
    restored = Store(restored_dir)
    try:
        assert len(restored.list_fields(sid)) == info["fields"]
        assert restored.get_slide(sid)["sample_id"] == "S-1"
    finally:
        restored.close()


def test_a_backup_that_cannot_be_written_leaves_nothing(store, tmp_path):
    _slide(store)
    with pytest.raises(OSError):
        store.backup(tmp_path / "no-such-folder" / "copy.sqlite")
    target = tmp_path / "copy.sqlite"
    target.mkdir()  # a folder in the way: the rename fails after the copy was made
    with pytest.raises(OSError):
        store.backup(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.sqlite", "data"]


def _real_field(n_cells=6, n_infected=2):
    """A field result and images whose raw frame is a real JPEG (crops can be cut again from it)."""
    import cv2
    import numpy as np

    rgb = np.full((1200, 1600, 3), 200, np.uint8)
    res = _result(n_cells=n_cells, n_infected=n_infected)
    ok, raw = cv2.imencode(".jpg", rgb)
    assert ok
    return res, FieldImages(JPEG + b"annotated", raw.tobytes(),
                            {i: JPEG + bytes([i]) for i, c in enumerate(res.cells) if c.infected})


def _two_finished_and_one_open(store, monkeypatch, *finished: tuple[str, str]) -> dict:
    """One real field on each slide finished on the given (sample id, day), and on an open slide ("OPEN",
    started 2026-11-29): {sample id: field id}."""
    clock = iter([f"{day}T{t}+00:00" for _, day in finished for t in ("08:00:00", "08:01:00", "09:00:00")]
                 + ["2026-11-29T08:00:00+00:00", "2026-11-29T08:01:00+00:00"])
    monkeypatch.setattr(store_mod, "utc_now", lambda: next(clock))
    fields = {}
    for sample in [name for name, _ in finished] + ["OPEN"]:
        sid = _slide(store, sample)
        res, images = _real_field()
        fields[sample] = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=images)
        if sample != "OPEN":
            store.finish_slide(sid, lambda slide, totals: {"call": "negative"})
    return fields


def test_raw_frames_of_old_finished_slides_are_deleted_and_everything_else_kept(store, monkeypatch):
    from datetime import UTC, datetime, timedelta

    from device.service import free_raw_frames

    fields = _two_finished_and_one_open(store, monkeypatch, ("OLD", "2026-10-01"), ("RECENT", "2026-11-20"))
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    month_ago = now - timedelta(days=30)
    assert store.count_images("raw", month_ago) == 1 and store.count_images("raw") == 2  # the open slide: never
    old = fields["OLD"]
    raw = store.field_image_path(old, "raw")
    crops = [store.cell_crop_path(c["id"]) for c in store.field_cells(old) if c["infected"]]
    assert raw.is_file() and len(crops) == 2
    crops[0].unlink()  # a crop a power cut lost: cut again from the raw frame before that goes
    size = raw.stat().st_size
    freed = free_raw_frames(store, month_ago)
    assert freed == {"fields": 1, "bytes": size, "failed": 0, "crops_recut": 1, "swept": 0}
    assert not raw.exists() and store.field_image_path(old, "raw") is None and not store.get_field(old)["has_raw"]
    assert store.field_image_path(old, "annotated").is_file() and all(p.is_file() for p in crops)
    assert store.get_slide(store.get_field(old)["slide_id"])["result_json"]  # the result stays
    for sample in ("RECENT", "OPEN"):
        assert store.field_image_path(fields[sample], "raw").is_file(), sample
    assert free_raw_frames(store, month_ago) == {"fields": 0, "bytes": 0, "failed": 0, "crops_recut": 0,
                                                 "swept": 0}  # nothing left to do
    assert free_raw_frames(store, now)["fields"] == 1  # 0 days: every finished slide, still not the open one
    assert store.field_image_path(fields["OPEN"], "raw").is_file()


def test_free_space_cut_short_is_finished_by_the_next_run_and_crops_are_synced_first(store, monkeypatch):
    from datetime import UTC, datetime

    from device import service
    from device.service import free_raw_frames

    sids = []
    for sample in ("A", "B"):
        sid = _slide(store, sample)
        res, images = _real_field()
        store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=images)
        store.finish_slide(sid, lambda slide, totals: {"call": "negative"})
        sids.append(sid)
    later = datetime(2100, 1, 1, tzinfo=UTC)
    raws = [store.field_image_path(f["id"], "raw") for sid in sids for f in store.list_fields(sid)]
    field_ids = [f["id"] for sid in sids for f in store.list_fields(sid)]
    crops = store.crop_files(field_ids)
    assert len(crops) == 4 and all(p == store.cell_crop_path(cid) for cid, p in crops)
    events = []
    real_sync = service.sync_filesystem
    monkeypatch.setattr(service, "sync_filesystem", lambda p: (events.append("sync"), real_sync(p))[1])
    from pathlib import Path

    real_unlink = Path.unlink

    def failing_card(path, *a, **kw):  # the first raw frame cannot be deleted (a failing card)
        events.append(path.name)
        if path == raws[0]:
            raise OSError(5, "Input/output error")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(Path, "unlink", failing_card)
    freed = free_raw_frames(store, later)
    assert freed["fields"] == 2 and freed["failed"] == 1 and not raws[1].exists() and raws[0].exists()
    assert events[0] == "sync" and all(e.endswith("_raw.jpg") for e in events[1:]), "crops synced before"
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert store.count_images("raw") == 0  # no row names the frame left behind...
    again = free_raw_frames(store, later)
    assert again["swept"] == 1 and again["failed"] == 0 and not raws[0].exists()  # ...and the next run deletes it


def test_a_clock_confirmation_travels_with_the_records_it_is_about(store, tmp_path, monkeypatch):
    clock = iter(["2027-11-30T08:00:00+00:00", "2026-11-30T09:00:00+00:00", "2026-11-30T09:05:00+00:00",
                  "2026-11-30T09:10:00+00:00"])
    monkeypatch.setattr(store_mod, "utc_now", lambda: next(clock))
    _slide(store, "AHEAD")  # dated by a clock a year ahead
    older = tmp_path / "older.sqlite"
    store.backup(older)  # a copy from before the confirmation
    mark = store.confirm_clock()
    assert mark["up_to_slide_id"] == 1 and store.newest_record_time() is None
    _slide(store, "NEXT")
    assert store.newest_record_time().isoformat() == "2026-11-30T09:05:00+00:00"
    # the copy made before the confirmation is restored: its records count again, as they should
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    os.replace(older, restored_dir / store_mod.DB_NAME)
    restored = Store(restored_dir)
    try:
        assert restored.newest_record_time().isoformat() == "2027-11-30T08:00:00+00:00"
    finally:
        restored.close()


def test_free_space_deletes_nothing_when_the_crops_cannot_be_written_to_the_card(store, monkeypatch):
    from datetime import UTC, datetime

    from device import service

    sid = _slide(store)
    res, images = _real_field()
    fid = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=images)
    store.finish_slide(sid, lambda slide, totals: {"call": "negative"})
    raw = store.field_image_path(fid, "raw")

    def failing_card(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(service, "sync_filesystem", failing_card)
    with pytest.raises(OSError):
        service.free_raw_frames(store, datetime(2100, 1, 1, tzinfo=UTC))
    assert raw.is_file() and store.get_field(fid)["has_raw"]  # the raw frame stays: a lost crop is cut from it
    monkeypatch.undo()
    assert service.free_raw_frames(store, datetime(2100, 1, 1, tzinfo=UTC))["fields"] == 1
    assert not raw.exists()


def test_annotated_images_of_old_finished_slides_can_be_deleted_and_a_cut_short_run_is_finished(store,
                                                                                                 monkeypatch):
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from device.service import free_annotated_images

    fields = _two_finished_and_one_open(store, monkeypatch, ("OLD", "2026-10-01"), ("OLD2", "2026-10-02"))
    month_ago = datetime(2026, 11, 30, 12, 0, tzinfo=UTC) - timedelta(days=30)
    assert store.count_images("annotated", month_ago) == 2 and store.count_images("annotated") == 2
    paths = {k: store.field_image_path(v, "annotated") for k, v in fields.items()}
    cells_before = store.field_cells(fields["OLD"])
    real_unlink = Path.unlink

    def failing_card(path, *a, **kw):  # the first annotated image cannot be deleted (a failing card)
        if path == paths["OLD"]:
            raise OSError(5, "Input/output error")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(Path, "unlink", failing_card)
    freed = free_annotated_images(store, month_ago)
    assert freed["fields"] == 2 and freed["failed"] == 1 and freed["swept"] == 0
    assert paths["OLD"].exists() and not paths["OLD2"].exists()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    for k in ("OLD", "OLD2"):  # no row names them: the pages say the picture is gone
        assert not store.get_field(fields[k])["has_annotated"]
        assert store.field_image_path(fields[k], "annotated") is None
    again = free_annotated_images(store, month_ago)
    assert again["swept"] == 1 and again["fields"] == 0 and not paths["OLD"].exists()
    # what stays: the raw frame (a separate choice), the cells with their boxes, the flagged-cell crops
    assert store.field_image_path(fields["OLD"], "raw").is_file()
    assert store.field_cells(fields["OLD"]) == cells_before
    assert all(store.cell_crop_path(c["id"]).is_file() for c in cells_before if c["infected"])
    assert paths["OPEN"].is_file() and store.get_field(fields["OPEN"])["has_annotated"]  # open slides: never
    with pytest.raises(ValueError):
        store.delete_images("cell0", [fields["OLD"]])  # only the two deletable kinds


def test_a_database_at_schema_6_gets_the_discarded_field_numbers_column(tmp_path, monkeypatch):
    # migration 6 was once all there was of discarded slides: such a database must still take fields
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:6])
    Store(tmp_path).close()
    monkeypatch.undo()
    new = Store(tmp_path)
    try:
        assert new.pragma("user_version") == store_mod.SCHEMA_VERSION
        sid = _slide(new)
        fid = new.add_field(sid, _result(rejected="blurred"), source="camera", model_sha256=MODEL.sha256,
                            images=_images(_result(rejected="blurred")))
        new.discard_slide(sid)
        sid2 = _slide(new, "S-2")
        assert sid2 == sid + 1
        assert new.add_field(sid2, _result(), source="camera", model_sha256=MODEL.sha256,
                             images=_images(_result())) == fid + 1
    finally:
        new.close()


def test_a_finished_slide_keeps_no_camera_views(tmp_path, monkeypatch):
    """The views (about 15 kB a field, three quarters of the database's growth: 20 kB a field measured)
    only guard against counting a field twice, and a finished slide takes no more fields. Finishing drops
    them; migration 8 drops those that finished slides kept before it."""
    view = b"\x89PNG view"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:7])
    old = Store(tmp_path)
    with old._tx() as c:  # as version 7 started slides (create_slide writes today's columns)
        done, still_open = (c.execute(
            "INSERT INTO slides (sample_id, started_at, model_name, model_sha256, threshold, fp_rate_per_cell,"
            " target_rbc, rbc_per_ul) VALUES (?, '2026-11-01T08:00:00+00:00', ?, ?, ?, ?, 2000, 5e6)",
            (sample, MODEL.name, MODEL.sha256, MODEL.threshold, MODEL.fp_rate_per_cell)).lastrowid
            for sample in ("S-1", "S-2"))
    fields = {sid: old.add_field(sid, _result(), source="camera", model_sha256=MODEL.sha256,
                                 images=_images(_result()), view_png=view) for sid in (done, still_open)}
    with old._tx() as c:  # finished under version 7, views kept
        c.execute("UPDATE slides SET status = 'finished', result_json = '{}' WHERE id = ?", (done,))
    assert old.field_view_png(fields[done]) == view
    old.close()
    monkeypatch.undo()
    s = Store(tmp_path)
    try:
        assert s.pragma("user_version") == store_mod.SCHEMA_VERSION
        assert s.field_view_png(fields[done]) is None  # the finished slide's view went
        # ...but the records as the previous software left them were copied first: it can go back to them
        copy = tmp_path / f"{store_mod.DB_NAME}.before-schema-{store_mod.SCHEMA_VERSION}"
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        conn = sqlite3.connect(copy)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
        assert conn.execute("SELECT png FROM field_views WHERE field_id = ?", (fields[done],)).fetchone()[0] == view
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, like the download
        conn.close()
        wal = tmp_path / f"{store_mod.DB_NAME}-wal"
        assert not wal.exists() or wal.stat().st_size == 0  # the migration's WAL went back to the card
        assert s.counted_views_png(still_open) == {fields[still_open]: view}  # the open slide's stays
        third = _slide(s, "S-3")
        fid = s.add_field(third, _result(), source="camera", model_sha256=MODEL.sha256, images=_images(_result()),
                          view_png=view)
        s.finish_slide(still_open, lambda slide, totals: {"call": "negative"})
        assert s.field_view_png(fields[still_open]) is None  # finishing drops them
        assert s.counted_views_png(third) == {fid: view}  # another slide's are not touched
        assert s.totals(still_open)["fields_used"] == 1  # the field itself stays
    finally:
        s.close()


def test_no_copy_is_made_of_new_or_current_records_or_without_room(tmp_path, monkeypatch, caplog):
    Store(tmp_path / "new").close()
    Store(tmp_path / "new").close()  # opened again at the current schema
    assert not list((tmp_path / "new").glob("*.before-schema-*"))
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:7])
    Store(tmp_path / "full").close()
    monkeypatch.undo()
    monkeypatch.setattr(store_mod, "MIGRATION_COPY_MARGIN", 1 << 62)  # a card with no room for a copy
    s = Store(tmp_path / "full")  # migrates all the same
    assert s.pragma("user_version") == store_mod.SCHEMA_VERSION
    s.close()
    assert not list((tmp_path / "full").glob("*.before-schema-*"))
    assert "no copy of the records before the schema migration" in caplog.text


def test_a_failed_copy_is_cleaned_up_and_the_migration_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:7])
    Store(tmp_path).close()
    monkeypatch.undo()
    real_connect = sqlite3.connect

    def connect(path, *a, **kw):  # the copy cannot be written (a card error): the records are fine
        if str(path).endswith(f".before-schema-{store_mod.SCHEMA_VERSION}.tmp"):
            raise sqlite3.OperationalError("disk I/O error")
        return real_connect(path, *a, **kw)

    monkeypatch.setattr(store_mod.sqlite3, "connect", connect)
    s = Store(tmp_path)  # not "not a usable database": it is the copy that failed
    assert s.pragma("user_version") == store_mod.SCHEMA_VERSION
    s.close()
    assert (f"no copy of the records before the schema migration to version {store_mod.SCHEMA_VERSION}: disk I/O "
            "error") in caplog.text
    assert not [p for p in tmp_path.iterdir() if "before-schema" in p.name]  # nothing left to eat the space


def test_a_copy_a_power_cut_cut_short_is_removed_before_the_next_one(tmp_path, monkeypatch, caplog):
    """A kill during the copy before an upgrade left its half-written temporary file for good; the next
    start counted the room it took, found too little, and migrated without a copy."""
    import collections

    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:7])
    Store(tmp_path).close()
    monkeypatch.undo()
    half = tmp_path / f".{store_mod.DB_NAME}.before-schema-{store_mod.SCHEMA_VERSION}.tmp"
    half.write_bytes(b"\0" * (1 << 20))
    need = 2 * (tmp_path / store_mod.DB_NAME).stat().st_size + store_mod.MIGRATION_COPY_MARGIN
    usage = collections.namedtuple("usage", "total used free")

    def card(path):  # just enough room for the copy, less what the cut-short one still takes
        taken = sum(p.stat().st_size for p in tmp_path.glob(".*.tmp*"))
        return usage(1 << 40, 0, need + (1 << 19) - taken)

    monkeypatch.setattr(store_mod.shutil, "disk_usage", card)
    s = Store(tmp_path)
    s.close()
    assert "no copy of the records" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if "before-schema" in p.name) == [
        f"{store_mod.DB_NAME}.before-schema-{store_mod.SCHEMA_VERSION}"]  # the copy made whole, nothing else


def test_a_migration_that_keeps_failing_is_not_copied_at_every_start(tmp_path, monkeypatch):
    Store(tmp_path).close()
    failing = [*store_mod.MIGRATIONS, "ALTER TABLE no_such_table ADD COLUMN b;"]
    monkeypatch.setattr(store_mod, "MIGRATIONS", failing)
    copy = tmp_path / f"{store_mod.DB_NAME}.before-schema-{len(failing)}"
    with pytest.raises(StoreError, match="migration"):
        Store(tmp_path)
    made = copy.stat().st_mtime_ns
    time.sleep(0.02)
    with pytest.raises(StoreError, match="migration"):  # systemd restarts it
        Store(tmp_path)
    assert copy.stat().st_mtime_ns == made  # the same records: not copied again


def test_the_records_are_owner_only_also_in_a_folder_made_open_before(tmp_path):
    """Outside the systemd unit (umask 0077) the database was created 0644 in a data folder that already
    existed with mode 0755: every user of the machine could read the patient records."""
    import stat as stat_mod

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        s = Store(data)
        _slide(s)
    finally:
        os.umask(old)
    for name in (store_mod.DB_NAME, store_mod.DB_NAME + "-wal"):
        assert stat_mod.S_IMODE((data / name).stat().st_mode) == 0o600, name
    s.close()


def test_an_older_copy_restored_in_place_never_gives_a_slide_the_number_of_pictures_on_the_card(tmp_path):
    # restoring an older copy: slide 2 of the replaced records left its pictures in images/slide-2; the next
    # slide took number 2, and finishing it deleted them as files no record names
    data = tmp_path / "data"
    s = Store(data)
    one = _slide(s)
    s.add_field(one, _result(), source="camera", model_sha256=MODEL.sha256, images=_images(_result()))
    s.backup(tmp_path / "copy.sqlite")
    two = _slide(s, "S-2")
    s.add_field(two, _result(), source="camera", model_sha256=MODEL.sha256, images=_images(_result()))
    pictures = sorted(p.name for p in (data / "images" / f"slide-{two}").iterdir())
    assert pictures
    s.close()
    for suffix in ("", "-wal", "-shm"):  # the restore steps: the records replaced, the pictures left
        (data / (store_mod.DB_NAME + suffix)).unlink(missing_ok=True)
    os.replace(tmp_path / "copy.sqlite", data / store_mod.DB_NAME)
    s = Store(data)
    try:
        new = _slide(s, "OTHER-PATIENT")
        assert new == two + 1
        s.add_field(new, _result(), source="camera", model_sha256=MODEL.sha256, images=_images(_result()))
        s.finish_slide(new, lambda slide, totals: {"automatic": {}})
        assert sorted(p.name for p in (data / "images" / f"slide-{two}").iterdir()) == pictures
    finally:
        s.close()


def test_stray_picture_folders_neither_stop_nor_misnumber_new_slides(tmp_path, caplog):
    data = tmp_path / "data"
    (data / "images" / f"slide-{2**63 - 1}").mkdir(parents=True)  # left by hand: no slide could follow it
    (data / "images" / "slide-7").write_bytes(b"")  # a file, not a slide's folder
    (data / "images" / "slide-3").mkdir()
    s = Store(data)
    try:
        assert _slide(s) == 4  # above the real folder 3; the file and the huge number passed over
    finally:
        s.close()
    assert "not a slide's picture folder" in caplog.text


def test_an_unreadable_pictures_folder_is_said_plainly(tmp_path, monkeypatch):
    # a pictures folder of another owner (mode 0700): a bare PermissionError traceback at start-up
    data = tmp_path / "data"
    images = data / "images"
    images.mkdir(parents=True)
    iterdir = Path.iterdir

    def refused(self):
        if self == images:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    with pytest.raises(store_mod.StoreError, match="wrong owner"):
        Store(data)


def test_a_slide_whose_only_counted_field_was_excluded_is_not_discarded(store):
    """An excluded field is still a record (taken out with its reason): discarding its slide deleted it."""
    sid = _slide(store)
    res = _result()
    fid = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    store.exclude_field(fid, "other")
    with pytest.raises(Conflict):
        store.discard_slide(sid)
    assert store.get_field(fid)["excluded"] == "other" and len(store.field_cells(fid)) == 20


def test_a_field_the_quality_gate_rejected_is_not_excluded_nor_included(store):
    sid = _slide(store)
    res = _result(rejected="out of focus (sharpness 1.20 < 2.40): refocus")
    fid = store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    for reason in ("other", None):
        with pytest.raises(Conflict, match="rejected by the quality gate"):
            store.exclude_field(fid, reason)
    assert store.get_field(fid)["excluded"] is None


def test_a_review_decision_keeps_who_made_it(store):
    sid = _slide(store)
    res = _result()
    store.add_field(sid, res, source="camera", model_sha256=MODEL.sha256, images=_images(res))
    cell = store.flagged_cells(sid)[0]
    store.review_cell(cell["id"], "confirmed", by="tech A")
    got = store.get_cell(cell["id"])
    assert (got["review"], got["reviewed_by"]) == ("confirmed", "tech A") and got["reviewed_at"]
