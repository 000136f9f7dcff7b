"""Copying the records while fields are written: the in-memory and the file copy of a large database.

    python tests/benchmarks/bench_backup.py [--slides 1000] [--dir /tmp/bench-backup]

Builds a database of finished slides (12 fields of 200 cells each, as a busy clinic's months), then
times ``Store.snapshot`` (the admin download up to 128 MB) with its peak RSS, ``Store.backup`` (the
file copy above that) with the slowest ``add_field`` a technician saw meanwhile, and the clock check's
``newest_record_time`` that every page and status poll runs. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.analysis import CellVerdict, FieldResult  # noqa: E402
from device.store import FieldImages, ModelInfo, Store, utc_now  # noqa: E402

MODEL = ModelInfo("bench", "b" * 64, 0.9, 0.001)


def build(store: Store, n_slides: int, n_fields: int = 12, n_cells: int = 200) -> None:
    c = sqlite3.connect(store.db_path)
    c.execute("BEGIN")
    now = utc_now()
    result = json.dumps({"automatic": {"call": "negative", "rbc_count": n_fields * n_cells}})
    for sid in range(1, n_slides + 1):
        c.execute("INSERT INTO slides (id, sample_id, status, started_at, finished_at, model_name, model_sha256,"
                  " threshold, fp_rate_per_cell, target_rbc, rbc_per_ul, result_json) VALUES"
                  " (?, ?, 'finished', ?, ?, 'bench', ?, 0.9, 0.001, 2000, 5e6, ?)",
                  (sid, f"S{sid}", now, now, MODEL.sha256, result))
        for seq in range(1, n_fields + 1):
            fid = c.execute("INSERT INTO fields (slide_id, seq, captured_at, source, width, height, focus, rbc_count,"
                            " infected_count, model_sha256, threshold, file_key, has_raw) VALUES"
                            " (?, ?, ?, 'camera', 1280, 960, 4.0, ?, 0, ?, 0.9, 'k', 1)",
                            (sid, seq, now, n_cells, MODEL.sha256)).lastrowid
            c.executemany("INSERT INTO cells (field_id, idx, x, y, w, h, p_infected, infected) VALUES"
                          " (?, ?, ?, ?, 60, 60, 0.01, 0)", [(fid, i, 7 * i, 3 * i) for i in range(n_cells)])
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()


def field() -> tuple[FieldResult, FieldImages]:
    cells = [CellVerdict((6 * i, 5, 60, 60), 0.01, False) for i in range(200)]
    return FieldResult(1280, 960, None, cells, 4.0, 0.6, {"total_ms": 90.0}), FieldImages(b"\xff\xd8a", None, {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--dir", default="/tmp/bench-backup")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    store = Store(root)
    t = time.perf_counter()
    build(store, args.slides)
    print(f"database: {args.slides} finished slides, {store.database_bytes() / 1e6:,.0f} MB "
          f"(built in {time.perf_counter() - t:.0f} s)")
    for _ in range(3):
        t = time.perf_counter()
        store.newest_record_time()
        print(f"newest_record_time (every page and status poll): {1000 * (time.perf_counter() - t):.2f} ms")

    live = store.create_slide(sample_id="LIVE", model=MODEL, target_rbc=2000, rbc_per_ul=5e6)
    stop, latencies = threading.Event(), []

    def technician() -> None:
        while not stop.is_set():
            res, images = field()
            t0 = time.perf_counter()
            store.add_field(live, res, source="camera", model_sha256=MODEL.sha256, images=images)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)

    for label, copy in (("in memory (Store.snapshot)", lambda: store.snapshot()[1]),
                        ("to a file (Store.backup)", lambda: store.backup(root / "copy.sqlite"))):
        latencies.clear()
        stop.clear()
        worker = threading.Thread(target=technician)
        worker.start()
        time.sleep(0.3)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        t = time.perf_counter()
        info = copy()
        dt = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        stop.set()
        worker.join()
        print(f"copy {label}: {info['bytes'] / 1e6:,.0f} MB in {dt:.1f} s; peak RSS {rss0:,.0f} -> {rss1:,.0f} MB; "
              f"{len(latencies)} fields written meanwhile, slowest {1000 * max(latencies):.0f} ms")
    store.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
