"""NIH data loading: patient parsing on real names, patient-level splits, bad files."""

import csv
import shutil
from pathlib import Path

import pytest

from train.data import DataError, list_cells, load_arrays, patient_from_name, patient_split, split_patients

FIX = Path(__file__).parent / "fixtures" / "nih_cells"


@pytest.mark.parametrize(("name", "patient"), [
    ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "P61"),
    ("C68P29N_ThinF_IMG_20150819_134112_cell_144.png", "P29"),
    ("C47P8thinOriginalOlympusCX21_IMG_1.png", "P8"),
    ("C174P135NThinF_IMG_20151115_113219_cell_147.webp", "P135"),
    ("C37BP2_thinF_IMG_20150620_131423a_cell_92.webp", "C37BP2"),
    ("C51AP12thinF_IMG_20150724_160538_cell_113.webp", "C51AP12"),
    ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
    ("C12NThinF_IMG_20150614_124212_cell_161.png", "C12N"),
    ("C201ThinF_IMG_20151029_091810_cell_1.png", "C201"),
    ("C3thin_original_IMG_20150608_162922_cell_1.png", "C3"),
    ("C238NThinF_IMG_20151207_114038_cell_81.png", "C238N"),
    # renamed or re-cased copies: the slide number is never cut short into another patient's
    ("c37bp2_thinF_IMG_1.png", "C37BP2"),
    ("C12nThinF_IMG_1.png", "C12N"),
])
def test_patient_from_real_names(name, patient):
    assert patient_from_name(name) == patient


def test_parsing_agrees_with_the_patient_table_on_every_fixture_file():
    with (FIX / "patients.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 40
    for row in rows:
        assert patient_from_name(row["file"]) == row["patient"], row["file"]


@pytest.mark.parametrize("name", ["IMG_0001.png", "C12AthinF_IMG_1.png", "C1weird_IMG_1.png"])
def test_unparseable_name_is_a_clear_error(name):
    # C12AthinF once read as patient C1 (the healthy pattern gave back digits to its lookahead)
    with pytest.raises(DataError, match="cannot tell the patient"):
        patient_from_name(name)


def test_split_by_patient_is_disjoint_and_seeded():
    files, csv_split = list_cells(FIX)
    pts = sorted({f.patient for f in files})
    rest, held = split_patients(pts, 0.25, seed=3)
    assert set(rest).isdisjoint(held) and set(rest) | set(held) == set(pts)
    assert len(held) == round(0.25 * len(pts)) >= 1  # the share asked for, never nobody
    assert split_patients(pts, 0.25, seed=3) == (rest, held)
    # the seed decides which patients: some other seed holds out others
    assert any(split_patients(pts, 0.25, seed=s)[1] != held for s in range(4, 10))
    # the table's own split keeps every patient on one side
    sides = {}
    for f in files:
        sides.setdefault(f.patient, set()).add(csv_split[f.patient])
    assert all(len(s) == 1 for s in sides.values())


def test_without_csv_the_patient_comes_from_the_name(tmp_path):
    shutil.copytree(FIX, tmp_path / "d")
    (tmp_path / "d" / "patients.csv").unlink()
    files, split = list_cells(tmp_path / "d")
    assert split == {}
    assert {f.patient for f in files} >= {"C37BP2", "P135", "C1"}


def test_corrupt_files_are_skipped_with_a_count_not_a_crash(tmp_path, caplog):
    d = tmp_path / "d"
    shutil.copytree(FIX, d)
    good = sorted((d / "Parasitized").iterdir())[0]
    (d / "Parasitized" / "C37BP2_thinF_IMG_x_cell_1.png").write_bytes(good.read_bytes()[:200])  # truncated
    (d / "Uninfected" / "C1_thinF_IMG_x_cell_2.png").write_text("not an image")
    (d / "Uninfected" / "C1_thinF_IMG_x_cell_3.png").write_bytes(b"")
    (d / "Uninfected" / "C1_thinF_IMG_x_cell_4.png").symlink_to(tmp_path / "gone.png")  # a broken link
    files, _ = list_cells(d)
    x, y, kept, skipped = load_arrays(files, 32)
    assert len(skipped) == 4 and len(kept) == len(files) - 4 == len(x) == len(y)  # the link counted, not lost
    assert "skipped 4 unreadable files" in caplog.text


def test_missing_folder_and_empty_class_name_the_path(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        list_cells(tmp_path / "nope")
    (tmp_path / "Parasitized").mkdir()
    (tmp_path / "Uninfected").mkdir()
    shutil.copy(sorted((FIX / "Parasitized").iterdir())[0], tmp_path / "Parasitized")
    with pytest.raises(DataError, match="Uninfected"):
        list_cells(tmp_path)
    (tmp_path / "Uninfected").rmdir()
    with pytest.raises(DataError, match="class folder missing"):
        list_cells(tmp_path)


def _copy_fixture(tmp_path) -> Path:
    d = tmp_path / "cells"
    shutil.copytree(FIX, d)
    return d


def _rewrite_csv(d: Path, edit) -> None:
    lines = (d / "patients.csv").read_text().splitlines()
    (d / "patients.csv").write_text("\n".join(edit(lines)) + "\n")


def test_a_bom_header_reads_and_a_hidden_macos_copy_is_no_cell(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "patients.csv").write_bytes(b"\xef\xbb\xbf" + (d / "patients.csv").read_bytes())  # Excel's UTF-8
    first = sorted((d / "Uninfected").iterdir())[0]
    (d / "Uninfected" / ("._" + first.name)).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    files, split = list_cells(d)
    assert len(files) == len(list_cells(FIX)[0]) and split == list_cells(FIX)[1]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda lines: [lines[0].replace("file", "path")] + lines[1:], "no file column"),
    (lambda lines: [lines[0], lines[1].replace(",parasitized,", ",uninfected,"), *lines[2:]],
     "is labelled 'uninfected' but lies in"),
    (lambda lines: [lines[0]] + [lines[1].replace(",val", ",train")] + lines[2:], "is on both sides"),
    (lambda lines: [], "patients.csv is empty"),  # was read as "no table": a seeded split, without a word
    (lambda lines: [lines[0], ""], "has no rows with a file and a patient"),  # a header alone, the same
    # a test patient was trained on without a word: only train and val are read
    (lambda lines: [lines[0]] + [x.replace(",P135,val", ",P135,test") for x in lines[1:]], "has split 'test'"),
    # the table of the .webp copies beside the original .png cells: a seeded split trained its val patients
    (lambda lines: [lines[0]] + [x.replace(".webp,", ".png,") for x in lines[1:]], "names none of the"),
    (lambda lines: [lines[0]] + [x.replace(".webp,", ".png,") if x.endswith(",val") else x for x in lines[1:]],
     "none of its val rows names a cell file"),
])
def test_an_inconsistent_patient_table_is_a_clear_error(tmp_path, edit, message):
    d = _copy_fixture(tmp_path)
    _rewrite_csv(d, edit)
    with pytest.raises(DataError, match=message):
        list_cells(d)


def test_a_table_that_is_not_utf8_is_a_clear_error_and_stale_rows_are_counted(tmp_path, caplog):
    d = _copy_fixture(tmp_path)
    _rewrite_csv(d, lambda lines: lines + ["Uninfected/gone.png,uninfected,C999,train"])
    list_cells(d)
    assert "1 rows name no cell file" in caplog.text
    (d / "patients.csv").write_bytes((d / "patients.csv").read_bytes() + "Uninfected/é.png,x,y,z\n".encode("latin-1"))
    with pytest.raises(DataError, match="cannot read .*patients.csv"):
        list_cells(d)


def test_a_patient_written_in_lower_case_is_the_same_patient_and_every_image_suffix_is_read(tmp_path):
    """A table's p106 beside a file name's P106 put one patient on both sides; .jfif, .bmp or .tif cells (which
    the device reads) were left out without a word."""
    d = _copy_fixture(tmp_path)
    _rewrite_csv(d, lambda lines: [x.replace(",P106,", ",p106,") for x in lines])
    extra = sorted((d / "Parasitized").glob("C145P106*"))[0]
    shutil.copy(extra, extra.with_name("C145P106ThinF_IMG_extra_cell_1.jfif"))  # not in the table
    files, split = list_cells(d)
    assert {f.patient for f in files if "P106" in f.path.name} == {"P106"} and split["P106"] == "val"
    assert any(f.path.suffix == ".jfif" for f in files)


def test_a_table_row_without_a_split_is_a_training_row(tmp_path):
    """A row with no split value (a short line) before the first val row crashed the check for val rows."""
    d = _copy_fixture(tmp_path)
    _rewrite_csv(d, lambda lines: [lines[0], "Uninfected/gone.png,uninfected,C999"] + lines[1:])
    files, split = list_cells(d)
    assert len(files) == len(list_cells(FIX)[0]) and split == list_cells(FIX)[1]


def test_the_three_sides_of_a_split_never_share_a_patient():
    """Validation patients are exactly the table's val rows; patients with no split in the table, or not in
    it, are training or early-stopping patients; every patient is on one side only."""
    pts = ["P1", "P2", "P3", "C1", "C2", "C3"]
    split, source = patient_split(pts, {"P1": "val", "P2": "train", "C1": ""}, seed=1, monitor_fraction=0.5)
    assert split["val"] == ["P1"] and source == "patients.csv"
    assert set(split["train"]) | set(split["monitor"]) == {"P2", "P3", "C1", "C2", "C3"}
    assert split["monitor"] and split["train"]
    split, source = patient_split(pts, {}, seed=1, val_fraction=0.3, monitor_fraction=0.3)
    assert source.startswith("seeded patient split") and split["val"] and split["monitor"]
    for sides in (split, patient_split(pts, {"P1": "val"}, seed=2, monitor_fraction=0.3)[0]):
        train, monitor, val = (set(sides[k]) for k in ("train", "monitor", "val"))
        assert not (train & monitor or train & val or monitor & val) and train | monitor | val == set(pts)
    assert split_patients(["A", "B", "C"], 0.1, seed=0)[1] != []  # a share rounding to none holds one out


def test_the_model_logit_becomes_p_infected():
    """The reported metrics, the plots and the misclassified grid read p_infected = sigmoid(logit)."""
    import numpy as np

    from train.__main__ import predict_proba

    class Logits:
        def predict(self, x, batch_size=None, verbose=None):
            return np.array([[-3.0], [0.0], [3.0]], np.float32)

    p = predict_proba(Logits(), np.zeros((3, 4, 4, 3), np.uint8))
    assert p == pytest.approx([0.047426, 0.5, 0.952574], abs=1e-6)


def test_an_upper_case_suffix_is_a_cell_and_a_row_without_a_patient_takes_the_file_names(tmp_path):
    """A cell saved as .PNG (a camera's or Windows' capitals) is a cell like any other; a table row naming a
    file but no patient gives that file the patient of its name, never the patient ''."""
    d = _copy_fixture(tmp_path)
    first = sorted((d / "Uninfected").glob("C1_*"))[0]
    upper = first.with_name("C1_thinF_IMG_extra_cell_9.PNG")
    shutil.copy(first, upper)
    _rewrite_csv(d, lambda lines: [x for x in lines if not x.startswith(f"Uninfected/{first.name},")]
                 + [f"Uninfected/{first.name},uninfected,,train"])
    files, _ = list_cells(d)
    assert any(f.path == upper and f.patient == "C1" for f in files)
    assert all(f.patient for f in files) and {f.patient for f in files if f.path == first} == {"C1"}


def test_extra_positive_repeat_below_one_is_refused(tmp_path, capsys):
    from train.__main__ import parse_args

    base = ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]
    assert parse_args(base).extra_positive_repeat == 16  # the shipped recipe's
    assert parse_args([*base, "--extra-positive-repeat", "1"]).extra_positive_repeat == 1
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exc:
            parse_args([*base, "--extra-positive-repeat", bad])
        assert exc.value.code == 2
        assert f"--extra-positive-repeat must be at least 1, got {bad}" in capsys.readouterr().err


def test_training_and_conversion_cells_are_the_devices_model_input_byte_for_byte():
    """The one preprocessing path: train and convert read their cells through ``load_arrays``, which must give
    exactly what the device feeds the model, ``prepare_batch`` of the RGB crop (padding to a square on
    black, the resize, RGB order). Decoded here independently, by OpenCV in BGR and turned around, so a
    channel swap on either side shows too. A stretched resize plus a channel swap in ``load_arrays`` passed
    every test before this one."""
    import cv2
    import numpy as np

    from device.preprocess import prepare_batch

    files, _ = list_cells(FIX)
    crops = [cv2.imread(str(cf.path), cv2.IMREAD_COLOR)[:, :, ::-1] for cf in files]
    assert sum(c.shape[0] != c.shape[1] for c in crops) >= 10  # crops that are not square: the padding counts
    for size in (48, 64):
        x, y, kept, skipped = load_arrays(files, size)
        assert not skipped and len(kept) == len(files)
        assert x.dtype == np.uint8 and x.shape == (len(files), size, size, 3)
        assert np.array_equal(x, prepare_batch(crops, size))
        assert list(y) == [cf.label for cf in files]
    # and the first channel is the red one: the parasitized crops' stain is pink-purple, R above B in the cell
    red_minus_blue = [int(c[..., 0].astype(int).sum() - c[..., 2].astype(int).sum()) for c in crops]
    assert np.median(red_minus_blue) > 0


def test_train_and_convert_resize_and_reorder_no_pixels_of_their_own():
    """Every resize and channel reordering of cell pixels lives in ``device.preprocess``: train and convert
    call it and do none of their own (writing a crop file with OpenCV is the one colour conversion)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in sorted([*(root / "train").glob("*.py"), *(root / "convert").glob("*.py")]):
        tree = ast.parse(path.read_text())
        written = {id(inner) for call in ast.walk(tree)
                   if isinstance(call, ast.Call) and ast.unparse(call.func) == "cv2.imwrite"
                   for inner in ast.walk(call)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                f = ast.unparse(node.func)
                assert f not in ("cv2.resize", "tf.image.resize", "np.flip", "tf.reverse"), f"{where}: {f}"
                assert f != "cv2.cvtColor" or id(node) in written, f"{where}: a colour conversion"
            if isinstance(node, ast.Subscript) and "::-1" in ast.unparse(node.slice):
                raise AssertionError(f"{where}: a reversed axis ({ast.unparse(node)})")
