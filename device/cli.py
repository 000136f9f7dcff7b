"""Command-line entry points of the device package (no TensorFlow anywhere)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from device.config import RBC_PER_UL_RANGE, REVIEW_FLOOR_RANGE, AnalysisConfig, review_floor_at
from device.slide import threshold_text

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

logger = logging.getLogger(__name__)


def _progress(i: int, n: int, label: str, stream=None) -> None:
    """A one-line progress bar on stderr (only when there is more than one item)."""
    if n <= 1:
        return
    # looked up now, not bound at import: a caller that replaced sys.stderr (a test, a wrapper) had its
    # stream written to after it was closed
    stream = stream or sys.stderr
    if not stream.isatty():  # logs and CI: a line every 10%, no carriage returns
        if i == n or i % max(1, n // 10) == 0:
            stream.write(f"{i}/{n} {label}\n")
        return
    width = 30
    done = int(width * i / n)
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:40]:<40}")
    if i == n:
        stream.write("\n")
    stream.flush()


def _classifier(args):
    from device.classifier import CellClassifier
    from device.config import DEFAULT_MODEL_PATH

    return CellClassifier(args.model or DEFAULT_MODEL_PATH, threads=args.threads, threshold=args.threshold)


def _json_safe(value):
    """NaN and infinities (a blank field's undefined F1) become null: JSON has no NaN, and strict readers
    refuse the whole file over one."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: str | None, doc: dict) -> bool:
    """Write ``doc`` to ``path`` (if given) atomically: a full card or a kill leaves the previous file whole,
    never half of a new one. False, with a one-line error, when that fails."""
    if not path:
        return True
    from device.store import write_atomic

    try:
        target = _json_target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n"
        # the mode a plain write would give (the umask's), or the file's own when it exists
        umask = os.umask(0)
        os.umask(umask)
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~umask
        write_atomic(target, text.encode(), sync_dir=False, mode=mode)
    except OSError as exc:
        print(f"error: cannot write --json {path}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


STD_STREAMS = {Path("/dev/stdin"), Path("/dev/stdout"), Path("/dev/stderr")}
NOT_A_FILE = "is not a regular file (a device, a pipe, /dev/stdout)"


def _json_target(path: str) -> Path:
    """The file a ``--json`` path writes: a "latest.json" link's own target is the one to update.

    Raises OSError when the path is a link loop, or names something that is not a regular file (a device
    such as /dev/null, a pipe, /dev/stdout): the report replaces its target by renaming a new file over it,
    which would turn /dev/null into a plain file for the whole system when run as root.
    """
    if path == "-":  # the usual name of standard output: the report went to a file named "-"
        raise OSError(errno.EINVAL, "standard output is not supported: name a file for the report", path)
    target = Path(path)
    where = Path(os.path.abspath(path))
    if where.parts[1:2] == ("proc",) or where.parent == Path("/dev/fd") or where in STD_STREAMS:
        # /dev/stdout redirected to a file resolves to that file: the report renamed over it would drop
        # what the command printed there before
        raise OSError(errno.EINVAL, f"{NOT_A_FILE}: name a file for the report", path)
    if target.is_symlink():
        try:
            target = target.resolve(strict=False)
        except RuntimeError:  # Python 3.11: a link loop
            raise OSError(errno.ELOOP, "a link loop", path) from None
    if target.exists() and not target.is_file():
        what = "is a folder, not a file" if target.is_dir() else NOT_A_FILE
        raise OSError(errno.EINVAL, f"{what}: name a file for the report", path)
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _overwrites_input(json_path: str | None, inputs: list[Path]) -> bool:
    """True, with a one-line error, when ``--json`` names one of the files the command reads (an image, a
    folder's annotations): writing the report there would destroy it."""
    if not json_path:
        return False
    target = Path(json_path)
    for f in inputs:
        if _same_file(target, f):
            print(f"error: --json {target} is one of the inputs ({f}): name another file", file=sys.stderr)
            return True
    return False


def _outputs_writable(json_path: str | None = None, out_dir: str | None = None,
                      dir_option: str = "--annotate") -> bool:
    """Check the outputs before any work is done, so that a long batch is not lost at the end: False, with
    a one-line error, when they cannot be written. Creates the folders they need."""
    problem = None
    try:
        for option, path in (("--json", Path(json_path).parent if json_path else None), (dir_option, out_dir)):
            # a file where a folder must be (or be made): said so, not "cannot write to X: File exists"
            up = Path(path) if path else None
            while up is not None and not up.exists() and up != up.parent:
                up = up.parent
            if up is not None and up.exists() and not up.is_dir():
                what = json_path if option == "--json" else out_dir
                raise ValueError(f"{option} {what}: {up} is a file, not a folder")
        if json_path:
            p = _json_target(json_path)  # where the report will be written, checked now
            p.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(p.parent, os.W_OK):
                problem = f"--json {json_path}: folder {p.parent} is not writable"
        if out_dir and not problem:
            d = Path(out_dir)
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK):
                problem = f"{dir_option} {d}: folder is not writable"
    except OSError as exc:
        problem = f"cannot write to {exc.filename or json_path or out_dir}: {exc.strerror or exc}"
    except ValueError as exc:
        problem = str(exc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return problem is None


def _unique_name(stem: str, used: set[str], suffix: str = "_annotated.jpg",
                 taken: Callable[[str], bool] = lambda name: False) -> str:
    """``stem_annotated.jpg``, or ``stem_2_annotated.jpg``... when another input had the same stem, or when
    ``taken(name)`` (a copy another field left in the folder).

    Stems are cut to 150 bytes, so that the name stays under the usual 255-byte limit of file systems.
    Names differing only in case are taken as the same: on a FAT or exFAT stick they are one file.
    """
    stem = _cut(stem, 150)
    name, n = f"{stem}{suffix}", 1
    while name.casefold() in used or taken(name):
        n += 1
        name = f"{stem}_{n}{suffix}"
    used.add(name.casefold())
    return name


def _cut(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` bytes of file name, never inside a UTF-8 character (a name
    ending in half of one is not valid UTF-8: other tools cannot open it)."""
    raw = os.fsencode(text)
    if len(raw) <= max_bytes:  # nothing cut: a byte that is not UTF-8 (a camera's) was dropped from short names
        return text
    raw = raw[:max_bytes]
    for end in range(len(raw), max(len(raw) - 4, -1), -1):
        try:
            return raw[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return os.fsdecode(raw)  # not UTF-8 at all (bytes a camera wrote): kept as they are


# A cell crop is a box around one red cell: the NIH crops are at most 394 px and 2.6 times as long as wide.
# prepare_cell pads a crop to a square of its long side, so a strip (a 40000 x 300 panorama, 12 MP) asked
# for a 4.5 GB square and a 4 x 100000 one for 28 GB: the batch died with a MemoryError and its report.
MAX_CELL_CROP_SIDE_PX = 4096
MAX_CELL_CROP_ASPECT = 8.0


def _not_a_cell_crop(rgb: np.ndarray) -> str | None:
    """Why an image cannot be one cell's crop (``cells`` classifies crops, not fields), or None."""
    h, w = rgb.shape[:2]
    if max(h, w) > MAX_CELL_CROP_SIDE_PX:
        return (f"{w}x{h} px is not one cell's crop (at most {MAX_CELL_CROP_SIDE_PX} px a side): for a field "
                "use `python -m device analyze`")
    if max(h, w) > MAX_CELL_CROP_ASPECT * min(h, w):
        return (f"{w}x{h} px is not one cell's crop (a cell's box is at most {MAX_CELL_CROP_ASPECT:g} times as "
                "long as wide)")
    return None


def cmd_cells(args) -> int:
    import numpy as np

    from device.imageio import ImageError, iter_image_files, read_rgb
    from device.metrics import binary_metrics
    from device.preprocess import prepare_cell

    files = iter_image_files(args.paths)
    if not files:
        print("no image files found in " + ", ".join(args.paths), file=sys.stderr)
        return 2
    if _overwrites_input(args.json, files) or not _outputs_writable(args.json):
        return 2
    clf = _classifier(args)
    rows, errors, batch, batch_files = [], [], [], []

    def flush():
        if not batch:
            return
        p = clf.predict(np.stack(batch))
        for f, pi in zip(batch_files, p, strict=True):
            rows.append({"file": str(f), "p_infected": float(pi), "infected": bool(pi >= clf.threshold)})
        batch.clear()
        batch_files.clear()

    interrupted = False
    try:
        for i, f in enumerate(files, 1):
            try:
                crop = read_rgb(f, min_side_px=4, check_jpeg_data=True)
                problem = _not_a_cell_crop(crop)
                if problem:
                    raise ImageError(f"{f}: {problem}")
                batch.append(prepare_cell(crop, clf.input_size_px))
                batch_files.append(f)
            except ImageError as exc:
                errors.append({"file": str(f), "error": str(exc)})
                print(f"error: {exc}", file=sys.stderr)
            if len(batch) >= 256:
                flush()
            _progress(i, len(files), f.name)
    except KeyboardInterrupt:  # Ctrl-C: keep what was done
        interrupted = True
    flush()
    doc: dict = {"model": clf.card.name, "sha256": clf.sha256, "threshold": clf.threshold, "files": rows,
                 "errors": errors}
    if interrupted:
        doc["interrupted"] = True
        print(f"\ninterrupted: {len(rows) + len(errors)} of {len(files)} files done"
              + (f"; they are in {args.json}" if args.json else ""), file=sys.stderr)
    labelled = [(r["p_infected"], _label_of(Path(r["file"]))) for r in rows]
    labelled = [(p, y) for p, y in labelled if y is not None]
    if labelled and len({y for _, y in labelled}) == 2:
        y = np.array([y for _, y in labelled])
        p = np.array([p for p, _ in labelled])
        m = binary_metrics(y, p, clf.threshold)
        summary = {k: m[k] for k in ("n", "accuracy", "sensitivity", "specificity", "auc", "threshold")}
        doc["summary"] = summary
        print(json.dumps(summary))
    elif len(rows) <= 20:
        for r in rows:
            # rounded down, as the pages show scores: 0.9957 printed beside INFECTED read below 0.99574
            print(f"{r['file']}: p_infected={threshold_text(r['p_infected'])} "
                  f"{'INFECTED' if r['infected'] else 'uninfected'}")
    if len(rows) > 20 and "summary" not in doc or errors:  # say what happened, also without per-file lines
        flagged = sum(r["infected"] for r in rows)
        print(f"{len(rows)} cells classified: {flagged} infected, {len(rows) - flagged} uninfected at threshold "
              f"{threshold_text(clf.threshold)}; {len(errors)} files could not be read"
              + ("" if args.json else " (per file: --json FILE)"))
    if not _write_json(args.json, doc):
        return 1
    if interrupted:
        return 130
    return 1 if errors and not rows else 0


def _label_of(path: Path) -> int | None:
    """1 or 0 by the innermost Parasitized/ or Uninfected/ folder holding the cell (a run kept under
    lab/Parasitized/ must not label its Uninfected/ cells), None when there is neither."""
    for part in reversed(path.parts[:-1]):
        label = {"parasitized": 1, "uninfected": 0}.get(part.lower())
        if label is not None:
            return label
    return None


def cmd_analyze(args) -> int:
    from device.analysis import AnalysisSettings
    from device.imageio import ANNOTATED_MARKER, holds_annotated_copies, identical_copies, iter_image_files
    from device.slide import summarize_slide

    # an annotate folder inside an input folder: its copies (boxes drawn on them) are not fields to count
    if args.annotate and any(_same_file(Path(args.annotate), Path(p)) for p in args.paths):
        what = "an input folder: its annotated copies would be read as fields next time" if Path(
            args.annotate).is_dir() else "one of the input images"
        print(f"error: --annotate {args.annotate} is {what}; name another folder", file=sys.stderr)
        return 2
    named_copies = next((p for p in args.paths if Path(p).is_dir() and holds_annotated_copies(Path(p))), None)
    if named_copies is not None:
        print(f"error: {named_copies} holds annotated copies written by analyze --annotate (boxes drawn over the "
              "cells), not fields: analyse the original pictures", file=sys.stderr)
        return 2
    files = iter_image_files(args.paths, exclude=[Path(args.annotate)] if args.annotate else [])
    if not files:
        print("no image files found in " + ", ".join(args.paths), file=sys.stderr)
        return 2
    if args.annotate:  # images named one by one (a shell glob) in the annotate folder: the same, and worse
        ann = Path(args.annotate).resolve()
        inside = next((f for f in files if Path(os.path.abspath(f)).parent.resolve() == ann), None)
        if inside is not None:
            print(f"error: --annotate {args.annotate} holds an input image ({inside}): annotated copies would be "
                  "written over inputs or read as fields next time; name another folder", file=sys.stderr)
            return 2
    if _overwrites_input(args.json, files) or not _outputs_writable(args.json, args.annotate):
        return 2
    if args.annotate:
        try:
            (Path(args.annotate) / ANNOTATED_MARKER).write_text(
                "Annotated copies written by `python -m device analyze --annotate`: boxes drawn over the cells.\n"
                "`analyze` does not read this folder as fields.\n")
        except OSError as exc:
            print(f"error: --annotate {args.annotate}: cannot write {ANNOTATED_MARKER}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    clf = _classifier(args)
    fp_rate = clf.card.false_positive_rate_at(clf.threshold)  # what the device's slide call uses too
    if args.slide and fp_rate is None:
        if clf.card.false_positive_rate is None and not clf.card.data.get("operating_curve"):
            print(f"error: --slide needs the model's false-positive rate per healthy cell, and the card of "
                  f"{clf.card.name} states none: this model makes no slide calls (analyse without --slide, or use "
                  "a model whose card states it)", file=sys.stderr)
        else:
            print(f"error: --slide needs the false-positive rate at threshold {threshold_text(clf.threshold)}, and "
                  "the model card's operating curve does not reach down to it: use a higher --threshold",
                  file=sys.stderr)
        return 2
    settings = AnalysisSettings(threshold=args.threshold)
    out_dir = Path(args.annotate) if args.annotate else None
    images: list[dict] = []
    # a copy of a field under another name (a picture saved twice) is one field: listed, not counted again
    copies = identical_copies(files)
    # stopped another way (systemctl stop, `timeout`, a closed SSH session) as by Ctrl-C: the part done is
    # written, and the annotate folder's record of its copies with it
    previous = _stop_signals_interrupt()
    try:
        _analyze_files(files, clf, settings, out_dir, images, args.verbose, copies)
    except KeyboardInterrupt:  # Ctrl-C: the fields done so far are kept, and said to be a part
        print(f"\ninterrupted: {len(images)} of {len(files)} images done"
              + (f"; they are in {args.json}" if args.json else ""), file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = sum("error" in d for d in images)
    n_copies = sum("copy_of" in d and "error" not in d for d in images)
    analysed = [d for d in images if "error" not in d and "copy_of" not in d]  # read, each for itself
    interrupted = len(images) < len(files)
    result: dict = {"model": clf.card.name, "sha256": clf.sha256, "threshold": clf.threshold, "images": images,
                    "failed": failed, "copies": n_copies}
    if interrupted:
        result["interrupted"] = {"done": len(images), "of": len(files)}
    if failed:
        print(f"{failed} of {len(images)} images could not be read (errors above)"
              + (": the slide counts the others" if args.slide else ""), file=sys.stderr)
    if args.slide:
        used = [d for d in analysed if not d["rejected"]]
        s = summarize_slide(
            sum(d["rbc_count"] for d in used), sum(d["infected_count"] for d in used),
            threshold=clf.threshold, fp_rate_per_cell=fp_rate,
            target_rbc=args.target, rbc_per_ul=args.rbc_per_ul,
            # as the service: unreadable files are errors, not rejected fields
            fields_used=len(used), fields_rejected=len(analysed) - len(used))
        result["slide"] = s.to_json()
        result["slide"]["images_failed"] = failed
        if s.call == "positive":
            print(f"slide: positive — {s.infected_count}/{s.rbc_count} infected, parasitemia "
                  f"{s.parasitemia_pct:.3f}% (95% CI {s.ci95_pct[0]:.3f}-{s.ci95_pct[1]:.3f}%), "
                  f"{s.parasites_per_ul:.0f} parasites/uL ({s.rbc_per_ul_source} {s.rbc_per_ul:.3g} RBC/uL); "
                  f"{s.call_reason}")
        else:  # the flagged share of a negative slide is the classifier's false positives, not a density
            print(f"slide: {s.call} — {s.infected_count}/{s.rbc_count} cells flagged; detection limit "
                  f"{s.detection_limit_pct:.3f}% of cells flagged ({s.detection_limit_per_ul:.0f} parasites/uL if "
                  f"every parasite were flagged, {s.rbc_per_ul_source} {s.rbc_per_ul:.3g} RBC/uL); {s.call_reason}")
    elif len(files) > 1:
        n_rej = sum(1 for d in analysed if d["rejected"])
        print(f"{len(images)} images: {failed} failed, {n_rej} rejected, "
              + (f"{n_copies} copies of others (counted once), " if n_copies else "")
              + f"{sum(d.get('rbc_count', 0) for d in images)} red cells, "
              f"{sum(d.get('infected_count', 0) for d in images)} flagged infected")
    if not _write_json(args.json, result):
        return 1
    if interrupted:
        return 130
    return 1 if failed and failed == len(files) - n_copies else 0  # nothing could be read


def read_field(path: Path) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Read a field for analysis: :func:`device.imageio.decode_field` of the file's bytes. Raises
    :class:`ImageError`."""
    from device.imageio import decode_field, read_image_bytes

    return decode_field(read_image_bytes(path), name=str(path))


def _scale_back(doc: dict, factor: int, size: tuple[int, int]) -> None:
    """A field decoded at 1/``factor``: its boxes and size as on the picture itself."""
    doc["width"], doc["height"] = size
    for c in doc["cells"]:
        x, y, w, h = (v * factor for v in c["bbox"])
        c["bbox"] = [x, y, min(w, size[0] - x), min(h, size[1] - y)]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_signals_interrupt() -> dict:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does; returns the handlers they had (none
    outside the main thread, where they cannot be set)."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _interrupt)
        except ValueError:  # not the main thread
            break
    return previous


def _analyze_files(files, clf, settings, out_dir, images: list, verbose: bool,
                   copies: dict[Path, Path] | None = None) -> None:
    """Analyse each file into ``images`` (appended as it goes, so that an interrupted batch keeps its part);
    ``copies`` (a file -> the earlier one with its bytes) are listed as such, not analysed again."""
    sources = _AnnotatedSources(out_dir) if out_dir else None
    try:
        _analyze_each(files, clf, settings, out_dir, images, verbose, sources, copies or {})
    finally:
        if sources is not None:
            sources.save()


# Beside the annotated copies: {copy's name: the picture it was drawn from (path, size, time of change)}
ANNOTATED_SOURCES = ".malaria-detect-annotated-sources.json"


class _AnnotatedSources:
    """Which field each annotated copy in an ``--annotate`` folder shows (:data:`ANNOTATED_SOURCES`): a copy
    is replaced only by one of the same picture. An earlier run over another slide's ``IMG_0001.jpg`` was
    overwritten, and that run's JSON then named a picture of another field."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ANNOTATED_SOURCES
        data = None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:  # none yet
            data = {}
        except (OSError, ValueError):  # unreadable: every copy there is someone else's (said below)
            pass
        if not isinstance(data, dict):
            logger.warning("%s is not a record of the copies: every copy there is kept", self.path)
        kept = {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
        # the names of copies deleted since are let go: the record does not grow with every name ever written
        self.by_name = {k: v for k, v in kept.items() if (folder / k).is_file()}
        self.changed = len(self.by_name) != len(kept)

    @staticmethod
    def picture(source: Path) -> dict:
        """The picture a copy was drawn from: its file (links resolved), size and time of change. A card that
        starts again at IMG_0001.jpg for the next slide puts another picture at the same path."""
        try:
            st = source.stat()
            return {"source": os.path.realpath(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            return {"source": os.path.realpath(source)}

    def taken(self, name: str, picture: dict) -> bool:
        """A copy of another picture (or of one unknown) than ``picture`` (:meth:`picture`) holds this name.
        On a FAT or exFAT stick names differing only in case are one file: a name of the record that differs
        only in case and names another picture may be that file, so the name is taken then too."""
        if not (self.path.parent / name).exists():
            return False
        folded = name.casefold()
        return name not in self.by_name or any(v != picture for k, v in self.by_name.items() if k.casefold() == folded)

    def wrote(self, name: str, picture: dict) -> None:
        self.by_name[name] = picture
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        from device.store import write_atomic

        try:
            write_atomic(self.path, (json.dumps(self.by_name, indent=1, sort_keys=True) + "\n").encode(),
                         sync_dir=False)
        except OSError as exc:
            print(f"\nerror: cannot write {self.path}: {exc.strerror or exc} (a later run will not replace "
                  "this run's copies)", file=sys.stderr)


def _unread_entry(f: Path, threshold: float, rejected: str, **marks) -> dict:
    """The JSON entry of a file with no analysis of its own (unreadable, or a copy of another): every key a
    field's entry has (a reader taking rbc_count from each one must not fail on this one), and ``marks``
    ("error", "copy_of") telling it from a field the quality gate rejected."""
    return {"image": str(f), **marks, "width": None, "height": None, "rejected": rejected, "focus": None,
            "threshold": threshold, "cells": [], "rbc_count": 0, "infected_count": 0, "timing_ms": {},
            "read_at": None}


def _analyze_each(files, clf, settings, out_dir, images, verbose, sources, copies) -> None:
    import cv2

    from device.analysis import analyze_field, draw_annotation
    from device.imageio import ImageError, swap_red_blue

    used_names: set[str] = set()
    unreadable: set[Path] = set()
    for i, f in enumerate(files, 1):
        if f in copies:  # the entry every image has, "copy_of" telling it apart; counted once, as the original
            if copies[f] in unreadable:  # nothing was counted: it failed as its original did
                error = f"{f}: the same bytes as {copies[f]}, which could not be read"
                entry = _unread_entry(f, clf.threshold, f"could not be read: {error}", error=error,
                                      copy_of=str(copies[f]))
            else:
                entry = _unread_entry(f, clf.threshold, f"the same picture as {copies[f]} (identical bytes): counted "
                                      "once", copy_of=str(copies[f]))
            images.append(entry)
            logger.warning("%s: %s", f, entry["rejected"])
            _progress(i, len(files), f.name)
            continue
        t0 = time.perf_counter()
        try:
            # one thread decodes here: libjpeg's warnings are this file's
            rgb, factor, size = read_field(f)
            res = analyze_field(rgb, clf, settings, shown_size=size if factor != 1 else None)
        except ImageError as exc:
            unreadable.add(f)
            images.append(_unread_entry(f, clf.threshold, f"could not be read: {exc}", error=str(exc)))
            print(f"\nerror: {exc}", file=sys.stderr)
            _progress(i, len(files), f.name)
            continue
        doc = {"image": str(f), **res.to_json()}
        # the share of the picture's size analysed (and drawn in the annotated copy): 1, or 1/2, 1/4, 1/8 for a
        # large JPEG (imageio.REDUCE_ABOVE_PIXELS); boxes and size are always the picture's own
        doc["read_at"] = 1 / factor
        if factor != 1:
            _scale_back(doc, factor, size)
        doc["timing_ms"]["read_ms"] = round((time.perf_counter() - t0) * 1000 - res.timing_ms.get("total_ms", 0), 2)
        images.append(doc)
        if out_dir:
            # Encoded here and written by Python: OpenCV's imwrite fails silently on an unwritable path and
            # crashes on a file name that is not UTF-8.
            picture = sources.picture(f)  # once: each name tried is checked against it
            target = out_dir / _unique_name(f.stem, used_names,
                                            taken=lambda name, picture=picture: sources.taken(name, picture))
            # cells near the threshold in amber, from the device's default review floor (none below it)
            near_from = review_floor_at(AnalysisConfig.review_floor, res.threshold)
            # drawn on the field itself, turned to BGR in place: it is not needed after this, and a copy of a
            # 24 MP field for the boxes and another for the colour order took peak memory to 355 MB
            bgr = swap_red_blue(rgb)
            ok, jpg = cv2.imencode(".jpg", draw_annotation(bgr, res, near_from, bgr=True),
                                   [cv2.IMWRITE_JPEG_QUALITY, 90])
            del bgr
            try:
                if not ok:
                    raise OSError("JPEG encoding failed")
                target.write_bytes(jpg.tobytes())
                sources.wrote(target.name, picture)
                doc["annotated"] = str(target)
            except OSError as exc:
                print(f"\nerror: cannot write annotated copy {target}: {exc.strerror or exc}", file=sys.stderr)
        if len(files) == 1 or verbose:
            if len(files) > 1 and sys.stderr.isatty():  # the bar's line cleared: the result takes its place
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
            state = f"rejected: {res.rejected}" if res.rejected else f"{res.infected_count}/{res.rbc_count} infected"
            print(f"{f}: {state} ({res.timing_ms.get('total_ms', 0):.0f} ms)")
        _progress(i, len(files), f.name)


def cmd_evaluate_fields(args) -> int:
    from device.fields import FieldsError, evaluate_fields, format_report
    from device.preprocess import prepare_batch

    folder = Path(args.dir)
    if args.json and Path(os.path.abspath(args.json)).parent.resolve().is_relative_to((folder / "images").resolve()):
        # a record may name an image in a sub-folder: nothing in there is a place for the report
        print(f"error: --json {args.json} lies in the images folder {folder / 'images'}, among the inputs: "
              "name a file elsewhere", file=sys.stderr)
        return 2
    reads = [folder / "annotations.json", *sorted((folder / "images").glob("*"))]
    if args.errors:
        problem = None
        out = Path(args.errors)
        if _same_file(out, folder / "images"):
            problem = "is the images folder"
        elif args.json and out.resolve() == Path(args.json).resolve():
            problem = "is also the --json file"
        elif out.is_dir() and any(out.iterdir()):
            problem = "is not empty (pictures of an earlier run would mix with these)"
        if problem:
            print(f"error: --errors {out} {problem}: name a new or empty folder", file=sys.stderr)
            return 2
    if _overwrites_input(args.json, reads) or not _outputs_writable(args.json, args.errors, "--errors"):
        return 2

    classify, threshold, trained_on = None, 0.5, frozenset()
    if not args.no_classifier:
        clf = _classifier(args)
        threshold = clf.threshold
        if not args.include_training_fields:
            trained_on = clf.card.training_field_images

        def classify(crops):
            return clf.predict(prepare_batch(crops, clf.input_size_px))

    try:
        report = evaluate_fields(args.dir, classify=classify, threshold=threshold, iou=args.iou,
                                 progress=lambda i, n, name: _progress(i, n, name),
                                 partial_labels=args.partial_labels, ignore_border_gt=not args.count_border_cells,
                                 trained_on=trained_on,
                                 review_floor=review_floor_at(args.review_floor, threshold))
    except FieldsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if not _write_json(args.json, report):
        return 1
    if args.errors and not _write_error_views(folder, report, Path(args.errors)):
        return 1
    return 0 if report["images"] else 1  # nothing evaluated is a failure


def _write_error_views(folder: Path, report: dict, out_dir: Path) -> bool:
    """One PNG per red-cell detection error and per classification error (held-out fields) of ``report``
    in ``out_dir``."""
    import cv2

    from device.fields import error_view
    from device.imageio import ImageError, read_rgb

    errors = report["detection_errors"] + report.get("classification", {}).get("cell_errors", [])
    kinds = {"missed": "missed", "not segmented": "notsegmented", "false positive": "fp",
             "cell missed": "cellmissed", "extra cell": "extracell"}
    name, image = None, None
    used: set[str] = set()
    written = 0
    for e in errors:
        target = None
        try:
            if e["image"] != name:  # each list comes image by image
                name, image = e["image"], read_rgb(folder / "images" / e["image"])
            view = error_view(image, e)
            own = e["bbox"] if e["kind"] == "extra cell" else e["box"]  # each error's own cell: its name
            x, y = (int(v) for v in own[:2])
            score = "none" if e["p_infected"] is None else f"{e['p_infected']:.3f}"
            stem = f"{_cut(Path(e['image']).stem, 100)}-{kinds[e['kind']]}-{score}-{x}-{y}"
            target = out_dir / _unique_name(stem, used, ".png")
            ok, png = cv2.imencode(".png", cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"PNG encoding failed for {target.name}")
            target.write_bytes(png.tobytes())
            written += 1
        except (OSError, ImageError) as exc:
            what = target or f"the picture of a {e['kind']} error in {e['image']}"
            print(f"error: cannot write {what}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return False
    print(f"{written} pictures of errors written to {out_dir}")
    return True


def cmd_check_config(args) -> int:
    from device.config import ConfigError, load_config
    from device.service import AdminSettings

    try:
        cfg = load_config(args.file)
        settings = AdminSettings(cfg.service.data_dir)
        data_dir = cfg.service.data_dir
        if os.access(settings.path, os.R_OK):
            cfg = settings.apply(cfg)  # what the service will run with
        elif os.path.exists(settings.path) or (os.path.isdir(data_dir) and not os.access(data_dir, os.X_OK)):
            # the service user's file (0600): a member of its group can check the rest
            print(f"{settings.path}: not read (run as the service user or root to check the admin's saved "
                  "settings too)", file=sys.stderr)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    # The service would start without a usable model and refuse every capture: say so here, where the
    # installer (and anyone checking a config) still can act. ModelError: "model error: …", exit 3.
    # Built as the service builds it: the card read and checked, then the interpreter made and its input
    # and output compared with the card (a card whose quantisation contradicts the file passed here and the
    # service then refused every capture).
    from device.classifier import CellClassifier

    clf = CellClassifier(cfg.model.path, threads=cfg.model.threads, threshold=cfg.model.threshold)
    print(f"{args.file}: OK (model {clf.card.data['name']}, sha256 {clf.card.sha256[:12]}…, on {clf.runtime})")
    return 0


def cmd_hash_password(args) -> int:
    import getpass

    from werkzeug.security import generate_password_hash

    pw = args.password if args.password is not None else getpass.getpass("admin password: ")
    if len(pw) < 8:
        print("password must have at least 8 characters", file=sys.stderr)
        return 2
    print(generate_password_hash(pw))
    return 0


def cmd_serve(args) -> int:
    from device.service import serve

    return serve(args.config, host=args.host, port=args.port)


def _ranged(convert, ok, not_a_number: str, outside: str):
    """An argparse type: ``convert`` the text, then check it with ``ok``; the messages get ``{text}``."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(not_a_number.format(text=text)) from None
        if not ok(v):
            raise argparse.ArgumentTypeError(outside.format(text=text))
        return v

    return parse


# (0, 1) also refuses nan: 0 cells flagged and a JSON file with NaN in it
_threshold = _ranged(float, lambda t: 0.0 < t < 1.0, "{text!r} is not a number",
                     "{text} is not a probability in (0, 1)")
_target = _ranged(int, lambda n: 1 <= n <= 1_000_000, "{text!r} is not a whole number of red cells",
                  "{text} is outside 1-1000000 red cells")
# the config's range; also refuses nan and inf (NaN in the JSON)
_rbc_per_ul = _ranged(float, lambda v: RBC_PER_UL_RANGE[0] <= v <= RBC_PER_UL_RANGE[1],
                      "{text!r} is not a number",
                      "{text} is outside 1e6-1e7 RBC/uL (a measured count, e.g. 4.5e6)")


def _out_path(text: str) -> str:
    """An output path option: an empty one (``--json ""``, an unset shell variable) wrote nothing and exited 0."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a file or folder")
    return text


_iou = _ranged(float, lambda v: 0.0 < v <= 1.0, "{text!r} is not a number", "{text} is not an IoU in (0, 1]")
_review_floor = _ranged(float, lambda v: REVIEW_FLOOR_RANGE[0] <= v <= REVIEW_FLOOR_RANGE[1],
                        "{text!r} is not a number", "{text} is not a review floor in 0.5-1")
_threads = _ranged(int, lambda n: 1 <= n <= 64, "{text!r} is not a whole number of threads",
                   "{text} is outside 1-64 threads")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m device", description="Malaria Detect device.")
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", help="the .tflite model (default: the shipped model in models/)")
        p.add_argument("--threshold", type=_threshold,
                       help="decision threshold in (0, 1) (default: the model card's)")
        p.add_argument("--threads", type=_threads, default=1, help="interpreter threads (default 1)")

    p = sub.add_parser("serve", help="run the service")
    p.add_argument("--config", help="TOML config file (default: the embedded demo config)")
    p.add_argument("--host", help="override service.host")
    p.add_argument("--port", type=int, help="override service.port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("analyze", help="analyse saved field images")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--json", type=_out_path, help="write per-image results (and the slide result) here")
    p.add_argument("--annotate", metavar="DIR", type=_out_path,
                   help="write annotated copies here (boxes: red flagged infected, amber near the threshold "
                        f"(from {AnalysisConfig.review_floor:g}, as the device shows them for review), green the "
                        "others)")
    p.add_argument("--slide", action="store_true", help="treat all images as fields of one slide")
    p.add_argument("--target", type=_target, default=2000, help="RBC counting target (default 2000)")
    p.add_argument("--rbc-per-ul", type=_rbc_per_ul, help="measured RBC count per uL (default: assume 5e6)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per image")
    model_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("cells", help="classify single-cell images")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", type=_out_path, help="write per-file results (and the summary) here")
    model_args(p)
    p.set_defaults(func=cmd_cells)

    p = sub.add_parser("evaluate-fields", help="measure segmentation and counting on annotated fields")
    p.add_argument("dir", help="folder with images/ and annotations.json")
    p.add_argument("--json", type=_out_path, help="write the report here")
    p.add_argument("--no-classifier", action="store_true", help="segmentation only")
    p.add_argument("--partial-labels", dest="partial_labels", action="store_true", default=None,
                   help="not every red cell is boxed: precision judges only detections inside boxes "
                        "(default: assumed for folders named like iml)")
    p.add_argument("--full-labels", dest="partial_labels", action="store_false", help="every red cell is boxed")
    p.add_argument("--iou", type=_iou, default=0.5,
                   help="least intersection over union of a detection and a box to match (default 0.5)")
    p.add_argument("--count-border-cells", action="store_true",
                   help="score boxes touching the image border too (the segmenter drops cut cells)")
    p.add_argument("--errors", metavar="DIR", type=_out_path,
                   help="write a picture of each error here (red cells missed or made up; parasite-bearing "
                        "cells missed, false positives), named by image, kind and score, to judge them by eye")
    p.add_argument("--review-floor", type=_review_floor, default=AnalysisConfig.review_floor,
                   help="also report the cells scored from this up to the threshold, which the device shows for "
                        f"review (default {AnalysisConfig.review_floor:g}, the device's; 1: none)")
    p.add_argument("--include-training-fields", action="store_true",
                   help="score the classifier on every image, even those its model card lists as training images "
                        "(by default they are reported apart)")
    model_args(p)
    p.set_defaults(func=cmd_evaluate_fields)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("hash-password", help="print a password hash for security.admin_password_hash")
    p.add_argument("--password", help="(default: prompt)")
    p.set_defaults(func=cmd_hash_password)
    return ap


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream: systemd sets JOURNAL_STREAM to its "device:inode", and a
    child whose stderr was redirected elsewhere inherits the variable all the same."""
    try:
        dev, ino = (int(v) for v in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """Each line of a record prefixed with its syslog priority, ``<N>``, as journald reads stderr."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def main(argv: list[str] | None = None) -> int:
    # a file name that is not UTF-8 (a card written elsewhere) is printed with escapes instead of
    # crashing the batch on its first line of output
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    if stderr_is_journal():
        # Under systemd, stderr goes to the journal: a <N> prefix gives each line its priority (without it
        # every warning is stored as "info" and `journalctl -p warning` shows none), and the journal has
        # its own timestamps.
        handler = logging.StreamHandler()
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from device.model_card import ModelError

    try:
        return args.func(args)
    except ModelError as exc:
        print(f"model error: {exc}", file=sys.stderr)
        return 3
