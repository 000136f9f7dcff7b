"""Safe image reading: clear per-file errors, and huge images refused before decoding."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000  # > 50 MP is refused before decoding (decompression bombs)
# The service's own fields (uploads, a replay folder's pictures) decoded whole stop at 25 MP (a 24 MP camera's
# 6000 x 4000 still passes), so that it stays under its unit's memory limits; a one-scan colour JPEG that
# decode_field reads reduced may have up to MAX_PIXELS. Measured (tests/benchmarks/bench_upload_memory.py): a
# 24 MP JPEG upload decoded whole took the service's peak from ~160 to 350-356 MB (131 cells; 412 MB with 739
# cells; 419 MB before a field's images were encoded from one frame copy instead of three), and at 1/2 to
# 203-207 MB; a 50 MP one decoded whole, accepted before, reached 718 MB and was killed at the unit's MemoryMax
# (then 600 MB); 48 MP at 1/2, 247-253 MB. The command line reads up to MAX_PIXELS.
MAX_SERVICE_FIELD_PIXELS = 25_000_000
# No file of an image that passes (<= 50 MP, 8-bit, at most 4 channels, even uncompressed) is larger than
# this: bigger files are refused before they are read into memory (a Pi has 1-8 GB).
MAX_FILE_BYTES = MAX_PIXELS * 4 + (8 << 20)
MIN_SIDE_PX = 16
MAX_SIDE_PX = 1 << 20  # OpenCV's decoders refuse a longer side (CV_IO_MAX_IMAGE_WIDTH/HEIGHT) with an error
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF, either byte order
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff"}
# pictures of kinds that are not read: a folder's files of these are named in a warning, not left out unsaid
OTHER_IMAGE_SUFFIXES = {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".tga", ".ppm", ".pgm", ".pnm",
                        ".dng", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".psd", ".svg", ".ico"}
# JPEG compression erases the small dark dots a parasite is: the 20 held-out IML fields (themselves
# JPEGs of quality ~78) saved again at quality 75 / 50 / 20 gave 24 / 22 / 16 of 29 parasite cells flagged
# instead of 25 with the shipped model, and at 10 nearly five times the false positives (14.7 per 1,000 against
# 3.1; earlier models: 18 / 15 / 10 instead of 19, and 14 / 11 / 7 instead of 18; README, "Image files"). A JPEG whose
# quantisation says a quality below this is refused.
MIN_JPEG_QUALITY = 70
# Lossy WebP likewise: the held-out IML fields saved again as WebP at quality 95 / 90 / 85 / 80 / 60 / 40 /
# 20 gave 23 / 23 / 22 / 20 / 15 / 7 / 7 of 29 parasite cells flagged with the shipped model (25 as stored;
# README, "Image files"; tests/benchmarks/bench_field_conditions.py --webp-quality Q), so below 85 is refused. Its
# quality is read back from the frame's quantiser index (webp_quantizer); libwebp's quality -> index:
_WEBP_QUALITY_INDEX = ((100, 0), (98, 2), (95, 6), (90, 12), (85, 20), (80, 27), (75, 36), (70, 39), (60, 45),
                       (50, 52), (40, 59), (30, 68), (20, 78), (10, 92), (1, 115))
MIN_WEBP_QUALITY = 85
MAX_WEBP_QUANTIZER = dict(_WEBP_QUALITY_INDEX)[MIN_WEBP_QUALITY]


def _webp_quality_text(index: int) -> str:
    """The libwebp quality a quantiser index corresponds to: "85", "85-90" between two, or "below 1"."""
    better = _WEBP_QUALITY_INDEX[0][0]
    for quality, q in _WEBP_QUALITY_INDEX:
        if index == q:
            return str(quality)
        if index < q:
            return f"{quality}-{better}"
        better = quality
    return "below 1"


# The IJG (libjpeg) luminance table that quality 50 uses; other qualities scale it.
_IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)
_ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
    7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
    39, 46, 53, 60, 61, 54, 47, 55, 62, 63])


class ImageError(ValueError):
    """An image that cannot be used, with a reason a person can act on."""


def header_size(data: bytes) -> tuple[int, int] | None:
    """Read (width, height) from a PNG, JPEG, WebP, BMP or TIFF header without decoding pixels.

    Returns None when the format is not recognised.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24:
            raise ImageError("truncated PNG header")
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"BM" and len(data) >= 26:
        if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit width and height
            return struct.unpack("<HH", data[18:22])
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:4] in TIFF_MAGICS:  # TIFF, BigTIFF
        return _tiff_size(data)
    return None


def _tiff_entries(data: bytes) -> dict[int, tuple[int, int, int]]:
    """The first IFD of a TIFF or BigTIFF (the image libtiff and OpenCV read): tag -> (type, count, offset of
    the value: in the entry itself when it fits there, else where the entry points). BigTIFF has 8-byte
    offsets and counts and 20-byte entries. Raises ImageError when the header cannot be read."""
    e = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    off, count, entry_size, value_at = ("Q", "Q", 20, 12) if big else ("I", "H", 12, 8)
    type_size = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
    try:
        (ifd,) = struct.unpack(e + off, data[(8 if big else 4) : (16 if big else 8)])
        (n,) = struct.unpack(e + count, data[ifd : ifd + struct.calcsize(count)])
        entries: dict[int, tuple[int, int, int]] = {}
        for i in range(min(n, 4096)):
            entry = ifd + struct.calcsize(count) + entry_size * i
            tag, typ = struct.unpack(e + "HH", data[entry : entry + 4])
            (k,) = struct.unpack(e + count.replace("H", "I"), data[entry + 4 : entry + value_at])
            where = entry + value_at
            if type_size.get(typ, 1) * k > (8 if big else 4):  # the value does not fit in the entry: an offset
                (where,) = struct.unpack(e + off, data[where : where + struct.calcsize(off)])
            entries.setdefault(tag, (typ, k, where))  # the first, as libtiff reads
        return entries
    except struct.error as exc:
        raise ImageError("unreadable TIFF header") from exc


def _tiff_number(data: bytes, entry: tuple[int, int, int]) -> int:
    typ, _, where = entry
    fmt = {3: "H", 4: "I", 16: "Q"}[typ]  # SHORT, LONG or LONG8
    return struct.unpack(("<" if data[:2] == b"II" else ">") + fmt, data[where : where + struct.calcsize(fmt)])[0]


def _tiff_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a TIFF's first IFD (OpenCV's own limit, 2^30 pixels, is far too high)."""
    entries = _tiff_entries(data)
    try:
        return _tiff_number(data, entries[256]), _tiff_number(data, entries[257])  # ImageWidth, ImageLength
    except (struct.error, KeyError) as exc:
        raise ImageError("unreadable TIFF header") from exc


def tiff_jpeg_tables(data: bytes) -> bytes | None:
    """For a TIFF whose image is JPEG-compressed (compression 6 or 7), the JPEG data holding its
    quantisation tables (the JPEGTables tag, else the first strip or tile); None for any other TIFF."""
    try:
        entries = _tiff_entries(data)
        if 259 not in entries or _tiff_number(data, entries[259]) not in (6, 7):
            return None
        if 347 in entries:  # JPEGTables: an abbreviated JPEG stream, SOI, DQT, DHT, EOI
            _, k, where = entries[347]
            return data[where : where + k]
        for offsets, counts in ((273, 279), (324, 325)):  # strips, tiles: each then a whole JPEG stream
            if offsets in entries and counts in entries:
                start, length = _tiff_number(data, entries[offsets]), _tiff_number(data, entries[counts])
                return data[start : start + length]
    except (ImageError, struct.error, KeyError):
        return None
    return None


def _png_end(data: bytes) -> int | None:
    """Where a whole PNG ends: just past its end chunk (IEND, empty), when its chunks run whole up to it
    and an image data chunk (IDAT) came first; None otherwise (cut short, or no pixels). Bytes after the
    end (a trailer some tools append) are not handed to the decoder: without an IDAT, OpenCV read on past
    IEND and allocated whatever a trailer declared (2 GB for a 117-byte file)."""
    pos, n, pixels = 8, len(data), False
    while pos + 8 <= n:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            end = pos + 12
            return end if pixels and length == 0 and end <= n else None
        pixels = pixels or kind == b"IDAT"
        pos += 12 + length  # length, type, data, CRC
    return None


def jpeg_orientation(data: bytes) -> int:
    """The EXIF Orientation (1-8) of a JPEG, 1 when it has none: phones store pictures as the sensor read
    them and say in EXIF how to turn them; the analysis and annotated copies must match what a viewer shows."""
    if data[:2] != b"\xff\xd8":
        return 1
    for marker, i, seg_len in _jpeg_segments(data):
        if marker != 0xE1 or data[i + 4 : i + 10] != b"Exif\x00\x00":
            continue
        tiff = data[i + 10 : i + 2 + seg_len]
        e = "<" if tiff[:2] == b"II" else ">"
        try:
            (ifd,) = struct.unpack(e + "I", tiff[4:8])
            (count,) = struct.unpack(e + "H", tiff[ifd : ifd + 2])
            for k in range(count):
                entry = ifd + 2 + 12 * k
                tag, typ = struct.unpack(e + "HH", tiff[entry : entry + 4])
                if tag == 0x0112 and typ == 3:
                    (value,) = struct.unpack(e + "H", tiff[entry + 8 : entry + 10])
                    return value if 1 <= value <= 8 else 1
        except struct.error:
            return 1
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image as its EXIF Orientation says (2-8: mirrored and/or rotated; 1: as stored)."""
    if orientation in (5, 6, 7, 8):  # the stored picture lies on its side: its columns become rows
        img = img.swapaxes(0, 1)  # transposed = orientation 5
        img = {5: img, 6: img[:, ::-1], 7: img[::-1, ::-1], 8: img[::-1]}[orientation]
    else:
        img = {1: img, 2: img[:, ::-1], 3: img[::-1, ::-1], 4: img[::-1]}.get(orientation, img)
    return np.ascontiguousarray(img)


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset, segment length) of each JPEG marker up to the first scan (SOS, included) or an
    end marker (EOI, length 0); stand-alone markers (SOI, TEM, RSTn) and fill bytes are skipped."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01, 0xFF, 0x00) or 0xD0 <= marker <= 0xD7:
            # FF 00 is no marker: libjpeg skips it while it looks for one, and so must this walk, or a frame
            # header hidden behind it would be read as the image's size
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            yield marker, i, 0
            return
        seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
        yield marker, i, seg_len
        if marker == 0xDA:
            return
        i += 2 + seg_len


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(marker, offset) of a JPEG's frame header: SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC); or None."""
    for marker, i, _ in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, i
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    frame = _jpeg_frame(data)
    if frame is None or frame[1] + 9 > len(data):
        raise ImageError("truncated JPEG: no frame header")
    h, w = struct.unpack(">HH", data[frame[1] + 5 : frame[1] + 9])
    return w, h


def jpeg_frame_marker(data: bytes) -> int | None:
    """The marker of a JPEG's frame header (0xC0 baseline, 0xC2 progressive, 0xC3 lossless...), or None."""
    frame = _jpeg_frame(data)
    return None if frame is None else frame[0]


# The first marker after a scan's compressed data: 0xFF (and fill bytes) before anything but a stuffed 0x00 or
# a restart marker. Only from the first 0xFF of a run: tried from each one, a run of 64 k fill bytes took 19 s.
_MARKER_AFTER_SCAN = re.compile(rb"(?<!\xff)\xff+([^\x00\xd0-\xd7\xff])")


def jpeg_single_scan(data: bytes) -> bool:
    """Whether a JPEG holds one scan of all its components: the end marker follows the first scan's compressed
    data. libjpeg decodes such a file row by row; a progressive file, or one of several scans (a first scan of
    fewer components than the frame says so, whatever follows it), holds every DCT coefficient of the whole
    picture while it is decoded, at any scale (2 bytes each: 288 MB for 48 MP at 4:4:4)."""
    components = jpeg_components(data)
    for marker, i, seg_len in _jpeg_segments(data):
        if marker == 0xDA:
            if i + 4 >= len(data) or data[i + 4] != components:
                return False
            m = _MARKER_AFTER_SCAN.search(data, i + 2 + seg_len)
            return m is not None and m.group(1) == b"\xd9"
    return False


def jpeg_components(data: bytes) -> int | None:
    """The number of colour components in a JPEG's frame header (1 gray, 3 colour, 4 CMYK), or None."""
    frame = _jpeg_frame(data)
    return data[frame[1] + 9] if frame is not None and frame[1] + 10 <= len(data) else None


def _jpeg_has_end(data: bytes) -> bool:
    """Whether the end-of-image marker follows the first scan.

    Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so the first
    FF D9 after the scan starts is the end of the image; an EXIF thumbnail's end marker lies before the
    scan, and whatever a phone appends after the end (a maker trailer, a motion photo's video) is ignored.
    """
    for marker, i, seg_len in _jpeg_segments(data):
        if marker == 0xDA:
            return data.find(b"\xff\xd9", i + 2 + seg_len) >= 0
    return False  # no scan, or an end before it: nothing to decode


def jpeg_quality(data: bytes) -> float | None:
    """The IJG quality (1-100) a JPEG's luminance quantisation table corresponds to, or None.

    The table's mean ratio to the standard one is the IJG scale factor S (%): quality (200 - S) / 2 for
    S <= 100, else 5000 / S. Cameras with tables of their own get the quality of the same mean step.
    """
    if data[:2] != b"\xff\xd8":
        return None
    for marker, i, seg_len in _jpeg_segments(data):
        if marker != 0xDB:  # quantisation tables, one or more per segment, all before the first scan
            continue
        j, end = i + 4, min(len(data), i + 2 + seg_len)
        while j < end:
            precision, table_id = data[j] >> 4, data[j] & 0x0F
            size = 128 if precision else 64
            values = np.frombuffer(data[j + 1 : j + 1 + size], ">u2" if precision else "u1")
            j += 1 + size
            if values.size != 64:
                return None
            if table_id == 0:
                table = np.empty(64)
                table[_ZIGZAG] = values
                scale = float(np.mean(table / _IJG_LUMINANCE)) * 100.0
                return (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return None


class _BoolDecoder:
    """VP8's boolean entropy decoder (RFC 6386, section 7), enough to read a frame header."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 2
        self.value = (data[0] << 8) | data[1] if len(data) >= 2 else 0
        self.range, self.bits = 255, 0

    def bool(self, prob: int = 128) -> int:
        split = 1 + (((self.range - 1) * prob) >> 8)
        if self.value >= split << 8:
            bit, self.range, self.value = 1, self.range - split, self.value - (split << 8)
        else:
            bit, self.range = 0, split
        while self.range < 128:
            self.value, self.range, self.bits = self.value << 1, self.range << 1, self.bits + 1
            if self.bits == 8:
                self.bits = 0
                if self.pos < len(self.data):
                    self.value |= self.data[self.pos]
                self.pos += 1
        return bit

    def literal(self, n: int) -> int:
        v = 0
        for _ in range(n):
            v = (v << 1) | self.bool()
        return v

    def signed(self, n: int) -> int:
        v = self.literal(n)
        return -v if self.bool() else v

    def optional_signed(self, n: int) -> int:
        return self.signed(n) if self.bool() else 0


def webp_quantizer(data: bytes) -> int | None:
    """The coarsest luma quantiser index (0-127) of a lossy WebP's key frame, or None (lossless, or not
    readable): what the encoder's quality became (libwebp: quality 95 -> 6, 90 -> 12, 80 -> 27, 50 -> 52).

    Read from the frame header (RFC 6386, 9.2-9.6): the segment quantisers when segmentation is on, else
    the frame's base index.
    """
    pos, end, frame = 12, len(data), None
    while pos + 8 <= end:
        fourcc, (size,) = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])
        if fourcc == b"VP8 ":
            frame = data[pos + 8 : pos + 8 + size]
            break
        if fourcc == b"ANMF":  # an animation: its first frame (the one decoded) holds its chunks after 16 bytes
            pos, end = pos + 8 + 16, min(end, pos + 8 + size)
            continue
        pos += 8 + size + (size & 1)
    if frame is None or len(frame) < 12 or frame[0] & 1:  # no lossy image, or not a key frame
        return None
    d = _BoolDecoder(frame[10:])
    d.literal(2)  # colour space, clamping
    segments = None
    if d.bool():  # segmentation
        update_map, update_data = d.bool(), d.bool()
        if update_data:
            absolute = d.bool()
            quant = [d.optional_signed(7) for _ in range(4)]
            for _ in range(4):
                d.optional_signed(6)  # loop filter levels
            segments = (absolute, quant)
        if update_map:
            for _ in range(3):
                if d.bool():
                    d.literal(8)
    d.literal(10)  # filter type, loop filter level, sharpness
    if d.bool() and d.bool():  # loop filter deltas present and updated
        for _ in range(8):
            d.optional_signed(6)
    d.literal(2)  # token partitions
    base = d.literal(7)
    if segments is None:
        return base
    absolute, quant = segments
    return max(min(127, max(0, q if absolute else base + q)) for q in quant)


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        b = data[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0x0F) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return w, h
    raise ImageError("truncated WebP header")


REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_rgb(data: bytes, *, name: str = "image", min_side_px: int = MIN_SIDE_PX,
               check_jpeg_data: bool = False, max_pixels: int = MAX_PIXELS,
               limit_note: str = "", reduce: int = 1) -> np.ndarray:
    """Decode encoded image bytes to HxWx3 uint8 RGB, refusing what cannot be analysed.

    Truncated PNG/JPEG files are refused (a decoder would fill the missing part with gray), as is
    anything :func:`to_rgb8` refuses. With ``check_jpeg_data`` a JPEG whose compressed data libjpeg finds
    damaged is refused too (see :func:`_libjpeg_warnings`). Every decoding holds :data:`JPEG_DECODE_LOCK`.
    Images over ``max_pixels`` (at most :data:`MAX_PIXELS`) are refused before decoding, the reason
    followed by ``limit_note``. Raises :class:`ImageError` with the reason.

    ``reduce`` 2, 4 or 8 decodes a colour JPEG (3 components) at that fraction of its size, by libjpeg's
    scaled inverse DCT: the full picture is never held (see :func:`decode_field`). ValueError for
    any other picture: a gray one would come out as colour and no longer be refused.
    """
    max_pixels = min(max_pixels, MAX_PIXELS)
    if reduce != 1 and (reduce not in REDUCED_FLAGS or data[:2] != b"\xff\xd8" or jpeg_components(data) != 3):
        raise ValueError(f"{name}: only a colour JPEG can be decoded reduced (asked: 1/{reduce})")
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        size = header_size(data)
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from exc
    if size is None:
        raise ImageError(f"{name}: not a supported image (PNG, JPEG, WebP, BMP, TIFF)")
    w, h = size
    if w * h > max_pixels:
        mp = f"{w * h / 1e6:.3f}".rstrip("0").rstrip(".")  # 25.005 MP over a 25 MP limit, not "25 MP"
        raise ImageError(f"{name}: {w}x{h} is {mp} MP, over the {max_pixels / 1e6:g} MP limit"
                         + limit_note)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        end = _png_end(data)
        if end is None:
            raise ImageError(f"{name}: truncated PNG (no end chunk after its image data)")
        data = data[:end]
    if max(w, h) > MAX_SIDE_PX:
        raise ImageError(f"{name}: {w}x{h} has a side over {MAX_SIDE_PX} px, more than the decoder reads")
    if data[:2] == b"\xff\xd8" and not _jpeg_has_end(data):
        raise ImageError(f"{name}: truncated JPEG (no end marker)")
    if data[:2] == b"\xff\xd8":
        quality = jpeg_quality(data)
        if quality is not None and quality < MIN_JPEG_QUALITY:
            raise ImageError(f"{name}: a JPEG saved at quality ~{quality:.0f}: compression this strong erases "
                             f"parasites; save at quality {MIN_JPEG_QUALITY} or more, or as PNG")
    if data[:4] in TIFF_MAGICS:
        tables = tiff_jpeg_tables(data)  # a TIFF holding a JPEG: compression erases parasites all the same
        quality = jpeg_quality(tables) if tables else None
        if quality is not None and quality < MIN_JPEG_QUALITY:
            raise ImageError(f"{name}: a TIFF compressed as a JPEG of quality ~{quality:.0f}: compression this "
                             "strong erases parasites; save it uncompressed, with LZW, or at JPEG quality "
                             f"{MIN_JPEG_QUALITY} or more")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        q = webp_quantizer(data)
        if q is not None and q > MAX_WEBP_QUANTIZER:
            raise ImageError(f"{name}: a lossy WebP compressed this strongly (quantiser {q}, quality about "
                             f"{_webp_quality_text(q)}) erases parasites; save at WebP quality "
                             f"{MIN_WEBP_QUALITY} or more, lossless WebP, or PNG")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[25] in (0, 4):
        # colour type 0 or 4 (gray, gray + alpha): OpenCV makes gray + alpha into four channels, which the
        # quality gate then rejected as a field without stain colour rather than refusing the file
        raise ImageError(f"{name}: grayscale image; the classifier needs the stain colours of an RGB field")
    buf = np.frombuffer(data, dtype=np.uint8)
    # UNCHANGED: 16-bit and alpha are seen, EXIF is not applied. An OS/2 bitmap (12-byte header) has neither,
    # and OpenCV 4.11 reads it as one gray channel unless asked for colour.
    os2_bitmap = data[:2] == b"BM" and struct.unpack("<I", data[14:18])[0] == 12
    warnings: list[str] = []
    listen = check_jpeg_data and data[:2] == b"\xff\xd8"
    try:
        # every format under the lock: a TIFF may hold JPEG data, which libjpeg decodes (and warns of) too
        with JPEG_DECODE_LOCK, _libjpeg_warnings(warnings) if listen else contextlib.nullcontext():
            if reduce != 1:  # EXIF orientation is applied below, as for every JPEG
                img = cv2.imdecode(buf, REDUCED_FLAGS[reduce] | cv2.IMREAD_IGNORE_ORIENTATION)
                if img is not None and img.shape[:2] != (-(-h // reduce), -(-w // reduce)):
                    # a lossless JPEG comes out whole: libjpeg scales only DCT data
                    raise ImageError(f"{name}: could not be decoded at 1/{reduce} of its size")
            else:
                img = cv2.imdecode(buf, cv2.IMREAD_COLOR if os2_bitmap else cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV's own limits and checks: a bad file, never a crashed batch
        raise ImageError(f"{name}: could not decode ({str(exc).strip().splitlines()[-1][:120]})") from exc
    damage = [w for w in warnings if not _is_padding(w, data)]
    if damage:
        raise ImageError(f"{name}: damaged JPEG data ({damage[0]}): part of the field would be analysed as "
                         "garbage; copy the file again from the camera or card")
    if img is None:
        raise ImageError(f"{name}: could not decode (corrupt or truncated file)")
    rgb = to_rgb8(img, name=name, min_side_px=min_side_px, bgr=True, owned=True)
    return apply_orientation(rgb, jpeg_orientation(data)) if data[:2] == b"\xff\xd8" else rgb


# A colour JPEG over this many pixels is decoded at 1/2, 1/4 or 1/8 of its size (the smallest step that brings
# it under) by :func:`decode_field`: `analyze` then stays under 250 MB (the full decode of a 24 MP JPEG held it
# twice over a moment, +144 MB, and analyze peaked at 268 MB, a 48 MP one at 413 MB; 12 MP peaks at 195 MB),
# and the service takes a one-scan JPEG of up to MAX_PIXELS without holding it whole. Only when its red cells
# stay at least REDUCED_MIN_CELL_PX across (twice the classifier's 48 px input), measured on a 1/8 probe decode
# (a 48 MP field: 44 ms, and 8 ms for the scale search).
REDUCE_ABOVE_PIXELS = 16_000_000
REDUCED_MIN_CELL_PX = 96.0
# JPEG frames libjpeg scales (DCT: baseline, extended, progressive, arithmetic-coded), and of those the ones
# decoded row by row when they hold one scan (not progressive)
_DCT_FRAMES = (0xC0, 0xC1, 0xC2, 0xC9, 0xCA)
_SEQUENTIAL_FRAMES = (0xC0, 0xC1, 0xC9)


def decode_field(data: bytes, *, name: str = "image", max_whole_pixels: int = MAX_PIXELS,
                 limit_note: str = "") -> tuple[np.ndarray, int, tuple[int, int]]:
    """Decode a field for analysis: (RGB image, the factor it was reduced by, the picture's (width, height)
    as shown, EXIF orientation applied). A colour DCT JPEG of more than :data:`REDUCE_ABOVE_PIXELS` (up to
    :data:`MAX_PIXELS`; over ``max_whole_pixels`` only a one-scan baseline one, :func:`jpeg_single_scan`) whose
    cells stay :data:`REDUCED_MIN_CELL_PX` across is decoded reduced; anything else is decoded whole, and
    refused over ``max_whole_pixels`` before decoding (``limit_note`` after the reason). Damaged JPEG data is
    refused (``check_jpeg_data`` of :func:`decode_rgb`). Raises :class:`ImageError`."""
    from device.segment import estimate_cell_diameter

    try:
        w, h = header_size(data) or (0, 0)
    except ImageError:  # decode_rgb says why
        w = h = 0
    factor = 1
    kind = jpeg_frame_marker(data) if data[:2] == b"\xff\xd8" and REDUCE_ABOVE_PIXELS < w * h <= MAX_PIXELS else None
    # DCT frames only (libjpeg does not scale a lossless one). One that holds its whole picture's coefficients
    # while decoded (progressive, or several scans) is reduced only when it would be taken whole anyway: a
    # 48 MP progressive JPEG took the service to 483 MB, and a 302-byte file claiming 49 MP, +282 MB.
    if (kind in _DCT_FRAMES and jpeg_components(data) == 3
            and (w * h <= max_whole_pixels or (kind in _SEQUENTIAL_FRAMES and jpeg_single_scan(data)))):
        factor = next(k for k in (2, 4, 8) if w * h <= REDUCE_ABOVE_PIXELS * k * k)
        # checked as the decode below (libjpeg's warnings, padding too, are heard, not printed); what it
        # refuses (damaged data, strong compression) is refused with its own reason, not for the size
        probe = decode_rgb(data, name=name, reduce=8, check_jpeg_data=True, min_side_px=1)
        diameter = estimate_cell_diameter(probe)
        if diameter is None or diameter * 8 / factor < REDUCED_MIN_CELL_PX:
            logger.info("%s: %dx%d read whole: cells of %s px would be too small at 1/%d", name, w, h,
                        "unknown" if diameter is None else f"{diameter * 8:.0f}", factor)
            factor = 1
    rgb = decode_rgb(data, name=name, check_jpeg_data=True, reduce=factor,
                     max_pixels=MAX_PIXELS if factor != 1 else max_whole_pixels, limit_note=limit_note)
    if factor == 1:
        return rgb, 1, (rgb.shape[1], rgb.shape[0])
    return rgb, factor, ((h, w) if jpeg_orientation(data) in (5, 6, 7, 8) else (w, h))  # on its side: turned


# libjpeg reports damage in a JPEG's compressed data as warnings on the process's stderr and decodes on:
# a block of garbage or zeros gives "premature end of data segment", and the image comes out with garbage
# or gray where the data was hit (measured: 8 kB of garbage in a BBBC041 field made 29 flagged "cells" and
# a slide positive). OpenCV passes them on unseen. Stray bytes between two segments are padding (some
# encoders and EXIF editors write it: the pixels are identical), and libjpeg says "N extraneous bytes
# before marker 0xXX" for them -- but it says the same when damage inside the compressed data threw its
# decoding off: garbage holding what reads as a marker (0x70, not a marker at all, in a file with restart
# markers), or a progressive file's scan left with thousands of bytes unread. So a warning is padding only
# where the file's own segment structure (:func:`_jpeg_padding`) has that many stray bytes before that
# marker outside the compressed data; before the end marker they may also follow flipped bits in the last
# scan, which is not told apart from padding. JPEG has no checksum: most flipped bits decode without a warning.
_JPEG_WARNING = re.compile(r"^(Corrupt JPEG data: .*|Premature end of JPEG file|Invalid JPEG file structure: .*)$")
_PADDING_WARNING = re.compile(r"^Corrupt JPEG data: (\d+) extraneous bytes before marker 0x([0-9a-f]{2})$")
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA


def _is_padding(warning: str, data: bytes) -> bool:
    """Whether libjpeg's ``warning`` is about stray bytes between the segments of ``data`` (harmless)."""
    m = _PADDING_WARNING.match(warning)
    if not m:
        return False
    n, marker = int(m.group(1)), int(m.group(2), 16)
    return marker == _JPEG_EOI or (n, marker) in _jpeg_padding(data)


def _jpeg_padding(data: bytes) -> set[tuple[int, int]]:
    """(stray bytes, marker) for every run of bytes that lies between two segments of a JPEG, outside its
    compressed data, counted as libjpeg counts them (a stuffed 0xFF00 counts 2). Walks the segments by their
    lengths; compressed data runs from a scan header to the first marker that is not a restart marker."""
    found: set[tuple[int, int]] = set()
    pos, end, in_scan = 2, len(data), False
    while pos < end - 1:
        if in_scan:  # to the marker that ends the compressed data: 0xFF not followed by 0x00, 0xFF or RSTn
            i = data.find(b"\xff", pos)
            while 0 <= i < end - 1 and (data[i + 1] == 0 or data[i + 1] == 0xFF or 0xD0 <= data[i + 1] <= 0xD7):
                i = data.find(b"\xff", i + 1 if data[i + 1] == 0xFF else i + 2)
            if i < 0 or i >= end - 1:
                break
            pos, in_scan = i, False
        stray = 0
        while pos < end:  # libjpeg's next_marker: skip to 0xFF, then past fill bytes; 0xFF00 is 2 stray bytes
            while pos < end and data[pos] != 0xFF:
                stray, pos = stray + 1, pos + 1
            while pos < end and data[pos] == 0xFF:
                pos += 1
            if pos >= end or data[pos] != 0:
                break
            stray, pos = stray + 2, pos + 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if stray:
            found.add((stray, marker))
        if marker == _JPEG_EOI:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            continue
        if pos + 2 > end:
            break
        pos += struct.unpack(">H", data[pos : pos + 2])[0]
        in_scan = marker == _JPEG_SOS
    return found
# Held while anything in this process decodes JPEG data (decode_rgb, a USB camera's MJPG frames): libjpeg
# warns of damage on the process's stderr, and the check that listens there must hear only its own file.
JPEG_DECODE_LOCK = threading.Lock()


@contextlib.contextmanager
def _libjpeg_warnings(found: list[str]) -> Iterator[None]:
    """Append to ``found`` what libjpeg warns of while the block decodes. Its warnings go to file
    descriptor 2, so that is pointed at a temporary file meanwhile; anything else written there meanwhile is
    passed on to the real stderr afterwards. Process-wide: called with :data:`JPEG_DECODE_LOCK` held, which
    every JPEG decoding in this process takes (a USB camera's MJPG frames too), so that no other thread's
    decoding warns into the same file. Without a stderr or a temporary file, the block runs without listening."""
    with contextlib.ExitStack() as stack:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            tmp = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except (OSError, ValueError):  # no temporary file (a read-only card), or no stderr at all
            yield
            return
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
            found += [line.strip() for line in lines if _JPEG_WARNING.match(line.strip())]
            other = "".join(line for line in lines if not _JPEG_WARNING.match(line.strip()))
            if other:
                with contextlib.suppress(OSError):
                    os.write(2, other.encode())


def swap_red_blue(img: np.ndarray, rows: int = 64) -> np.ndarray:
    """Turn a C-contiguous HxWx3 uint8 image from BGR to RGB (or back) in place, and return it.

    A band of rows at a time: OpenCV's cvtColor into its own source still makes a whole temporary copy
    (48 MB more at the peak for a 24 MP field), a band's copy is a few hundred kB.
    """
    for y in range(0, img.shape[0], rows):
        band = img[y : y + rows]
        cv2.cvtColor(band, cv2.COLOR_BGR2RGB, dst=band)
    return img


def to_rgb8(img: np.ndarray, *, name: str = "image", min_side_px: int = MIN_SIDE_PX, bgr: bool,
            owned: bool = False) -> np.ndarray:
    """Check a decoded array and return it as HxWx3 uint8 RGB (``owned``: ``img`` is the caller's to
    overwrite, and a BGR one is turned into RGB in place: a 24 MP field is 72 MB a copy).

    Only 8-bit colour fields are analysed: the classifier was trained on 8-bit colour photographs of
    stained smears, so grayscale (no stain colour), 16-bit (an unknown intensity mapping) and
    transparent images are refused with a reason rather than guessed at. A fully opaque alpha
    channel is dropped.
    """
    if img.dtype != np.uint8:
        bits = img.dtype.itemsize * 8
        raise ImageError(f"{name}: {bits}-bit {img.dtype} pixels; save fields as 8-bit colour (PNG or JPEG)")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        raise ImageError(f"{name}: grayscale image; the classifier needs the stain colours of an RGB field")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ImageError(f"{name}: unsupported channel layout {img.shape}")
    h, w = img.shape[:2]
    if min(h, w) < min_side_px:
        raise ImageError(f"{name}: {w}x{h} is too small (minimum side {min_side_px} px): use the camera's whole "
                         "picture, not a crop or a thumbnail")
    if img.shape[2] == 4:
        if img[:, :, 3].min() < 255:
            raise ImageError(f"{name}: image has transparent pixels; save the field without transparency")
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB) if bgr else img[:, :, :3]
    elif bgr and owned and img.flags.c_contiguous:
        swap_red_blue(img)
    elif bgr:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


def read_rgb(path: str | Path, *, min_side_px: int = MIN_SIDE_PX, check_jpeg_data: bool = False,
             max_pixels: int = MAX_PIXELS, limit_note: str = "") -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (``check_jpeg_data``, ``max_pixels``, ``limit_note``: see
    :func:`decode_rgb`). Raises :class:`ImageError` with the file and reason."""
    return decode_rgb(read_image_bytes(path), name=str(Path(path)), min_side_px=min_side_px,
                      check_jpeg_data=check_jpeg_data, max_pixels=max_pixels, limit_note=limit_note)


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file, for :func:`decode_rgb`. Raises :class:`ImageError` with the file and why
    it cannot be read (a folder, a pipe, a file too large for any field)."""
    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):  # listed by iter_image_files because it could not be searched
            try:
                os.listdir(p)
            except OSError as exc:
                raise ImageError(f"{p}: a folder that cannot be searched for images ({exc.strerror or exc}); "
                                 "its fields are not in this batch") from exc
            if p.is_symlink():
                raise ImageError(f"{p}: a link to a folder outside the one named ({p.resolve()}): not searched; "
                                 "name that folder too to include its fields")
            raise ImageError(f"{p}: a folder, not an image")
        if not stat.S_ISREG(st.st_mode):  # a pipe or a device would block or never end
            raise ImageError(f"{p}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{p}: {st.st_size / 1e6:.0f} MB is larger than any field image of at most "
                             f"{MAX_PIXELS / 1e6:.0f} MP can be ({MAX_FILE_BYTES / 1e6:.0f} MB)")
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    except ImageError:  # a ValueError too: said above, as it is
        raise
    except ValueError as exc:  # a NUL byte in the name (no file can have one)
        raise ImageError(f"{str(p)!r}: not a file name ({exc})") from exc
    return data


# Left by `analyze --annotate` in the folder it writes: the annotated copies (boxes drawn over the cells) are
# not fields. An annotate folder inside a slide's folder was read back as fields by the next run over that
# folder, and the slide counted its cells again (200 cells became 323).
ANNOTATED_MARKER = ".malaria-detect-annotated"


def holds_annotated_copies(folder: Path) -> bool:
    return (Path(folder) / ANNOTATED_MARKER).is_file()


def iter_image_files(paths: list[str | Path], exclude: list[Path] | tuple = ()) -> list[Path]:
    """Expand files and folders (recursively, through linked folders too) into a list of image files,
    each folder's sorted.

    A file named twice (directly, through a folder, or by another path to it) is listed once: a slide
    must not count one field twice. Each dropped repeat is logged. Folders in ``exclude`` (where the
    command writes its own images) are not searched. A sub-folder that cannot be listed is itself listed,
    so that reading it says why instead of its fields vanishing from the batch without a word. A sub-folder
    of annotated copies (:data:`ANNOTATED_MARKER`) is not searched.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    skip = {_identity(Path(e)) for e in exclude}
    for raw in paths:
        p = Path(raw)
        found = _walk_images(p, skip) if p.is_dir() else [p]
        for f in found:
            key = _file_key(f)
            if key in seen:
                logger.warning("%s: named more than once, used once", f)
                continue
            seen.add(key)
            out.append(f)
    return out


def _walk_images(top: Path, skip: set[Path]) -> list[Path]:
    found: list[Path] = []
    other: list[Path] = []
    visited: set[Path] = set()  # real folders: a link back up must not loop
    root = _identity(top)

    def unreadable(exc: OSError) -> None:
        found.append(Path(exc.filename))

    for folder, dirs, files in os.walk(top, followlinks=True, onerror=unreadable):
        real = _identity(Path(folder))
        if real in visited or real in skip:
            dirs[:] = []
            continue
        if real != root and ANNOTATED_MARKER in files:
            logger.info("%s: annotated copies written by analyze --annotate, not fields: not read", folder)
            dirs[:] = []
            continue
        if not real.is_relative_to(root):
            # a linked folder outside the one named (another slide's folder, /usr) is not searched, but
            # listed: reading it says so, instead of its fields vanishing from the batch without a word
            found.append(Path(folder))
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        for name in files:
            f = Path(folder) / name
            # a broken or looping link named like an image is listed too: reading it then says why
            # spaces after the suffix aside, as an upload's name: "b.png " (a name typed or mangled) was skipped
            suffix = f.suffix.lower().strip()
            if suffix in IMAGE_SUFFIXES:
                found.append(f)
            elif suffix in OTHER_IMAGE_SUFFIXES:
                other.append(f)
    if other:
        kinds = " ".join(sorted({f.suffix.lower().strip() for f in other}))
        logger.warning("%s: %d picture%s of a kind not read (%s) left out, e.g. %s: save fields as JPEG, PNG, "
                       "TIFF, BMP or WebP", top, len(other), "" if len(other) == 1 else "s", kinds, sorted(other)[0])
    return sorted(found)


def identical_copies(files: list[Path]) -> dict[Path, Path]:
    """The files whose bytes repeat an earlier one's (a field saved twice under two names), each with that
    earlier file. Only files of equal size are compared: first by their first 64 KiB (uncompressed fields of
    one camera all have one size), then whole. A file that cannot be read is nobody's copy: reading it says
    why."""
    groups: dict[object, list[int]] = {}
    for i, f in enumerate(files):
        try:
            st = f.stat()
        except (OSError, ValueError):  # reading it says why
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size:  # empty files: each is reported as such
            groups.setdefault(st.st_size, []).append(i)
    for whole in (False, True):
        narrowed: dict[object, list[int]] = {}
        for key, same in groups.items():
            if len(same) < 2:
                continue
            for i in same:
                digest = _digest(files[i], whole)
                if digest is not None:
                    narrowed.setdefault((key, digest), []).append(i)
        groups = narrowed
    return {files[i]: files[same[0]] for same in groups.values() for i in same[1:]}


def _digest(path: Path, whole: bool) -> bytes | None:
    """sha256 of the file's first 64 KiB, or of all of it; None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            if whole:
                return hashlib.file_digest(fh, "sha256").digest()
            return hashlib.sha256(fh.read(1 << 16)).digest()
    except OSError:
        return None


def _file_key(path: Path) -> tuple | Path:
    """What makes two names one file: the same inode (a link, a hard link, another path), else the path."""
    try:
        st = path.stat()
        return (st.st_dev, st.st_ino)
    except (OSError, RuntimeError):  # a broken link or a loop: read_rgb reports it
        return _identity(path)


def _identity(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: read_rgb reports it
        return path.absolute()
