"""NIH cell-image loading: file listing, patient of each cell, patient-level splits, pixel arrays."""

from __future__ import annotations

import csv
import logging
import random
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.imageio import IMAGE_SUFFIXES, ImageError, read_rgb
from device.preprocess import prepare_cell

logger = logging.getLogger(__name__)

CLASS_DIRS = ("Uninfected", "Parasitized")  # index = label: 0 uninfected, 1 parasitized
CLASS_NAMES = ("uninfected", "parasitized")
SUFFIXES = IMAGE_SUFFIXES  # what the device reads: a .jfif or .tif cell was left out without a word
SPLIT_SIDES = ("train", "val", "")  # a patients.csv split; "" (or no column): the training side

# Infected patients carry P<n> after the slide prefix: C100P61ThinF -> P61, C68P29N_ThinF -> P29,
# C47P8thinOriginalOlympusCX21 -> P8. A lettered slide (C37BP2_thinF, C51AP12thinF) is kept whole,
# as the NIH patient table does. Healthy slides (C1, C12NThinF, C201ThinF, C3thin_original) are
# their own patient: the C<m> prefix with an optional N.
_LETTERED_RE = re.compile(r"^(C\d+[A-Z]P\d+)", re.IGNORECASE)
_INFECTED_RE = re.compile(r"^C\d+P(\d+)", re.IGNORECASE)
# \d++ is possessive: the slide number is never cut short to satisfy what follows (C37BP2 -> "C3" was
# possible when the lookahead accepted the next digit)
_HEALTHY_RE = re.compile(r"^(C\d++N?)(?=$|[^A-Za-z0-9]|thin)", re.IGNORECASE)


class DataError(ValueError):
    """The data folder cannot be used as given."""


@dataclass(frozen=True)
class CellFile:
    path: Path
    rel: str  # "Parasitized/<name>", as in patients.csv
    label: int
    patient: str


def patient_from_name(name: str) -> str:
    """Patient ID from an NIH cell file name (``C100P61ThinF_IMG_...png`` -> ``P61``)."""
    stem = Path(name).name
    m = _LETTERED_RE.match(stem)
    if m:
        return m.group(1).upper()
    m = _INFECTED_RE.match(stem)
    if m:
        return f"P{int(m.group(1))}"
    m = _HEALTHY_RE.match(stem)
    if m:
        return m.group(1).upper()
    raise DataError(f"cannot tell the patient from file name {stem!r}")


def list_cells(data_dir: str | Path) -> tuple[list[CellFile], dict[str, str]]:
    """List cell files under ``data_dir/{Parasitized,Uninfected}``.

    Returns the files and the split each patient has in ``patients.csv`` (empty when absent).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    csv_path = root / "patients.csv"
    csv_rows = _read_patients_csv(csv_path) if csv_path.is_file() else {}
    files: list[CellFile] = []
    for label, cls in enumerate(CLASS_DIRS):
        d = root / cls
        if not d.is_dir():
            raise DataError(f"class folder missing: {d}")
        try:
            # hidden files (macOS ._ copies) are no cells; anything else with an image suffix is listed,
            # and what cannot be decoded (a broken link, a pipe) is skipped with its reason by load_arrays
            found = sorted(p for p in d.iterdir()
                           if not p.name.startswith(".") and not p.is_dir() and p.suffix.lower() in SUFFIXES)
        except OSError as exc:
            raise DataError(f"cannot list {d}: {exc.strerror or exc}") from exc
        if not found:
            raise DataError(f"class folder has no images ({'/'.join(sorted(SUFFIXES))}): {d}")
        for p in found:
            rel = f"{cls}/{p.name}"
            row = csv_rows.get(rel)
            if row and row.get("label") and row["label"] != CLASS_NAMES[label]:
                raise DataError(f"{csv_path}: {rel} is labelled {row['label']!r} but lies in {cls}/")
            # as the file names give it (P106, C12N): a table's p106 is the same patient
            patient = row["patient"].strip().upper() if row else patient_from_name(p.name)
            files.append(CellFile(p, rel, label, patient))
    listed = {f.rel for f in files}
    split: dict[str, str] = {}
    stale = 0
    for rel, row in csv_rows.items():
        side = (row.get("split", "") or "").strip()
        if side not in SPLIT_SIDES:  # a "test" patient would have been trained on without a word
            raise DataError(f"{csv_path}: {rel} has split {side!r}; only train or val are read here (keep test "
                            "patients out of the training folder)")
        if rel not in listed:
            stale += 1
            continue
        patient = row["patient"].strip().upper()
        if split.setdefault(patient, side) != side:
            raise DataError(f"{csv_path}: patient {patient} is on both sides ({split[patient]!r} and "
                            f"{side!r}); a patient's cells must never be split")
    if csv_rows and not split:
        # e.g. a table naming .webp copies beside the original .png download: its val patients were trained on
        raise DataError(f"{csv_path} names none of the {len(files)} cell files in {root} (it names "
                        f"{next(iter(csv_rows))!r}, the folder holds {files[0].rel!r}): give the table of these "
                        "files, or remove it to split by the patients in the file names")
    if any((r.get("split") or "").strip() == "val" for r in csv_rows.values()) and "val" not in split.values():
        raise DataError(f"{csv_path}: none of its val rows names a cell file in {root}: the validation "
                        "patients would be trained on")
    if stale:
        logger.warning("%s: %d rows name no cell file in %s (ignored)", csv_path, stale, root)
    return files, split


def _read_patients_csv(path: Path) -> dict[str, dict[str, str]]:
    """Rows of ``patients.csv`` by file; a table that cannot be read is a DataError naming it."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:  # an empty table silently meant "no table": a seeded split instead
                raise DataError(f"{path} is empty: give the header file,label,patient,split and a row per "
                                "cell, or remove it to split by the patients in the file names")
            missing = {"file", "patient"} - set(reader.fieldnames)
            if missing:
                raise DataError(f"{path}: no {' or '.join(sorted(missing))} column (header: file,label,patient,split)")
            rows = {row["file"]: row for row in reader if row.get("file") and row.get("patient")}
            if not rows:  # a header alone also meant "no table": a seeded split, without a word
                raise DataError(f"{path} has no rows with a file and a patient: give one per cell, or remove it "
                                "to split by the patients in the file names")
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def split_patients(
    patients: Iterable[str], fraction: float, seed: int, exclude: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Seeded patient-level split: returns (rest, held_out) with ~``fraction`` of patients held out."""
    ex = set(exclude)
    pts = sorted(set(patients) - ex)
    rng = random.Random(seed)
    rng.shuffle(pts)
    n = max(1, round(len(pts) * fraction)) if len(pts) > 1 and fraction > 0 else 0
    return sorted(pts[n:]), sorted(pts[:n])


def patient_split(
    patients: Iterable[str], csv_split: dict[str, str], seed: int, val_fraction: float = 0.15,
    monitor_fraction: float = 0.1,
) -> tuple[dict[str, list[str]], str]:
    """Train / monitor (early stopping, threshold) / val patients, and where the val side came from.

    Validation patients are the table's ``val`` rows when it has any, else a seeded patient split;
    the monitor patients are a seeded share of the rest. No patient is on two sides.
    """
    pts = sorted(set(patients))
    if csv_split and any(v == "val" for v in csv_split.values()):
        val = sorted(p for p in pts if csv_split.get(p) == "val")
        rest = sorted(p for p in pts if p not in set(val))
        source = "patients.csv"
    else:
        rest, val = split_patients(pts, val_fraction, seed)
        source = f"seeded patient split (seed {seed}, {val_fraction:.0%} held out)"
    train, monitor = split_patients(rest, monitor_fraction, seed + 1)
    return {"train": train, "monitor": monitor, "val": val}, source


def load_arrays(
    files: list[CellFile], size_px: int, workers: int = 2
) -> tuple[np.ndarray, np.ndarray, list[CellFile], list[tuple[str, str]]]:
    """Decode and preprocess cells. Unreadable files are skipped and returned with their reason."""

    def one(cf: CellFile):
        try:
            return prepare_cell(read_rgb(cf.path, min_side_px=4), size_px), None
        except (ImageError, ValueError) as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, files))
    xs, ys, kept, skipped = [], [], [], []
    for cf, (arr, err) in zip(files, results, strict=True):
        if arr is None:
            skipped.append((cf.rel, err))
            continue
        xs.append(arr)
        ys.append(cf.label)
        kept.append(cf)
    if skipped:
        logger.warning("skipped %d unreadable files:", len(skipped))
        for rel, err in skipped:
            logger.warning("  %s: %s", rel, err)
    x = np.stack(xs) if xs else np.zeros((0, size_px, size_px, 3), np.uint8)
    return x, np.asarray(ys, dtype=np.int32), kept, skipped
