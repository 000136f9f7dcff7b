"""Peak memory of `python -m device serve` for one uploaded field, by image size, measured from outside.

    .venv/bin/python tests/benchmarks/bench_upload_memory.py [--mp 12 24 25.5 50] [--at-once N] [--tiled]
                                                            [--progressive]

For each size a fresh service (replay camera) takes one warm-up capture, then one upload: a bundled sample
field scaled to that many megapixels, saved as JPEG quality 95, posted to /api/slides/N/fields as the
page does (a colour JPEG over 16 MP of cells this large is decoded at 1/2; --tiled repeats the sample
instead, so that the picture is decoded whole); with --at-once N, N such uploads (each made a little
different) sent together to N slides.
Printed: the service's peak RSS (VmHWM) before and after, and the answers. The unit
(systemd/malaria-detect.service) holds the service under MemoryHigh=600M, MemoryMax=800M. A benchmark:
nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_service import Client, free_port, rss_mb, start_service  # noqa: E402


def field_jpeg(megapixels: float, out: Path, mark: int = 0, tiled: bool = False,
               progressive: bool = False) -> tuple[int, int]:
    """A bundled sample field scaled to ``megapixels``, saved as JPEG quality 95; ``mark`` > 0 greys a corner,
    so that each of several uploads is another picture (the same one would be refused as a view counted).
    ``tiled``: the sample enlarged 1.5 x and repeated (cells stay ~150 px), which the service decodes whole: at
    1/2 they would be under 96 px. ``progressive``: saved progressive with full-size colour (4:4:4), which libjpeg
    decodes holding every coefficient of the picture (2 bytes each), at any scale: the costliest JPEG."""
    import cv2
    import numpy as np

    sample = sorted((ROOT / "device" / "samples").glob("*.jpg"))[0]
    bgr = cv2.imread(str(sample), cv2.IMREAD_COLOR)
    h0, w0 = bgr.shape[:2]
    scale = (megapixels * 1e6 / (w0 * h0)) ** 0.5
    w, h = round(w0 * scale), round(h0 * scale)
    if tiled:  # cells of ~150 px: within the 1/50 of the picture a field's cells span at least, at 24 MP
        cells = cv2.resize(bgr, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR)
        big = np.tile(cells, (int(scale / 1.5) + 1, int(scale / 1.5) + 1, 1))[:h, :w].copy()
    else:
        big = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    if mark:
        big[:50, :50] = 40 * mark
    flags = [cv2.IMWRITE_JPEG_QUALITY, 95]
    if progressive:
        flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    cv2.imwrite(str(out), big, flags)
    return w, h


def upload(c: Client, url: str, path: Path) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(c.base + url, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "X-CSRF-Token": c.token or "",
        "Accept": "application/json"})
    try:
        with c.opener.open(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def one(megapixels: float, tmp: Path, at_once: int = 1, tiled: bool = False, progressive: bool = False) -> None:
    images = [tmp / f"field_{megapixels:g}mp_{i}.jpg" for i in range(at_once)]
    w, h = [field_jpeg(megapixels, image, mark=i, tiled=tiled, progressive=progressive)
            for i, image in enumerate(images)][0]
    port = free_port()
    cfg = tmp / f"config_{megapixels:g}.toml"
    data = tmp / f"data_{megapixels:g}_{at_once}"
    cfg.write_text(f'[service]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n')
    proc, c, _, log = start_service(cfg, tmp / f"service_{megapixels:g}.log")
    answers: list[tuple[int, dict] | None] = [None] * at_once
    try:
        warm = c.post_json("/api/slides", {"sample_id": "WARM-UP"})[1]
        # warm-up capture: the interpreter's first call, the first stored field (another slide: the upload is
        # the same sample, which the slide that holds it would refuse as a view already counted)
        c.post_json(f"/api/slides/{warm['id']}/fields", {})
        c.post_json(f"/api/slides/{warm['id']}/finish", {})
        urls = [f"/api/slides/{c.post_json('/api/slides', {'sample_id': f'MEM-{i}'})[1]['id']}/fields"
                for i in range(at_once)]
        _, before = rss_mb(proc.pid)

        def send(i: int) -> None:
            answers[i] = upload(c, urls[i], images[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(at_once)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _, after = rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()

    def what(answer: tuple[int, dict] | None) -> str:
        if answer is None:
            return "no answer"
        status, body = answer
        return (f"stored, {body['field']['rbc_count']} cells" if status == 201
                else f"{status}: {body.get('error', body)}"[:160])

    size = images[0].stat().st_size / 1e6
    print(f"{w}x{h} ({w * h / 1e6:.1f} MP, {size:.1f} MB JPEG) x {at_once} at once: peak RSS {before:.0f} MB "
          f"before, {after:.0f} MB after (+{after - before:.0f}); " + "; ".join(what(a) for a in answers)
          + ("" if alive else "; THE SERVICE DIED"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp", type=float, nargs="+", default=[12.3, 24.0, 25.5, 50.0],
                    help="image sizes in megapixels (default: 12.3 24 25.5 50)")
    ap.add_argument("--at-once", type=int, default=1, help="uploads sent together, each to its own slide")
    ap.add_argument("--tiled", action="store_true",
                    help="the sample tiled, not enlarged: cells of ~150 px, so a JPEG over 16 MP is decoded whole")
    ap.add_argument("--progressive", action="store_true", help="saved progressive at 4:4:4 (the costliest JPEG)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upload-memory-") as tmp:
        for mp in args.mp:
            one(mp, Path(tmp), args.at_once, args.tiled, args.progressive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
