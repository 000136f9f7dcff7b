"""Memory and time of the CSV exports against the size of the records.

    python tests/benchmarks/bench_export.py [--fields 200000] [--per-slide 30] [--at-once 1]

Writes ``--fields`` fields (``--per-slide`` to a slide, finished) straight into a fresh database, then asks
the app (Flask's test client, no camera, no model) for ``/export/fields.csv`` and ``/export/slides.csv``,
``--at-once`` requests at a time, reading each answer piece by piece as a browser would and keeping none
of it. Prints the size, the time and the process's peak resident memory before and after each export
(peak RSS only grows: run the exports in the order printed). A measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.service import FieldAnalyser  # noqa: E402
from device.store import Store  # noqa: E402
from device.web import create_app  # noqa: E402
from tests.conftest import make_config  # noqa: E402


class _NoCamera:
    def status(self) -> dict:
        return {"state": "connected", "message": None}

    def latest(self):
        return None

    def preview_jpeg(self):
        return None


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fill(store: Store, n_fields: int, per_slide: int) -> int:
    n_slides = -(-n_fields // per_slide)
    when = "2026-11-01T08:00:00+00:00"
    result = json.dumps({})
    conn = store._conn()
    with conn:
        conn.executemany(
            "INSERT INTO slides (id, sample_id, patient_id, operator, status, started_at, finished_at, model_name,"
            " model_sha256, threshold, fp_rate_per_cell, target_rbc, rbc_per_ul, result_json) VALUES"
            " (?, ?, ?, 'op', 'finished', ?, ?, 'cellnet', ?, 0.9789, 0.0004, 2000, 5e6, ?)",
            [(i, f"SAMPLE-{i:06d}", f"PAT-{i:06d}", when, when, "ab" * 32, result) for i in range(1, n_slides + 1)])
        timing = json.dumps({"segment_ms": 41.2, "classify_ms": 30.1, "total_ms": 91.3})
        conn.executemany(
            "INSERT INTO fields (slide_id, seq, captured_at, source, width, height, rejected, focus, rbc_count,"
            " infected_count, model_sha256, threshold, timing_json, file_key, has_raw) VALUES"
            " (?, ?, ?, 'camera', 1280, 960, NULL, 3.5, 110, 1, ?, 0.9789, ?, ?, 1)",
            [(1 + i // per_slide, 1 + i % per_slide, when, "ab" * 32, timing, f"{i:016x}") for i in range(n_fields)])
    return n_slides


def _export(client, path: str, at_once: int) -> tuple[int, float]:
    sizes: list[int] = []

    def one() -> None:
        r = client.get(path)
        sizes.append(sum(len(piece) for piece in r.response))  # read as sent, nothing kept
        r.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(sizes), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=200_000)
    ap.add_argument("--per-slide", type=int, default=30)
    ap.add_argument("--at-once", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        n_slides = _fill(store, args.fields, args.per_slide)
        app = create_app(make_config(Path(tmp)), store, _NoCamera(), FieldAnalyser(store, None, model_error="none"))
        client = app.test_client()
        print(f"{args.fields:,} fields in {n_slides:,} slides; {args.at_once} export(s) at once")
        for path in ("/export/fields.csv", "/export/slides.csv"):
            before = _peak_mb()
            size, seconds = _export(client, path, args.at_once)
            print(f"  {path}: {size / 1e6:.1f} MB in {seconds:.1f} s; peak RSS {before:.0f} -> {_peak_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
