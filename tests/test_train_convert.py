"""Training smoke run and conversion on the real fixture cells (TensorFlow: training side only)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "nih_cells"
RUN_OUTPUTS = ["model.keras", "metrics.json", "classification_report.txt", "curves.png", "confusion_matrix.png",
               "roc.png", "misclassified.png", "split.json", "command.txt", "history.json"]


def run_module(*args, cwd=ROOT):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def fixture_cells(size: int, per_class: int | None = None) -> np.ndarray:
    """The fixture's cells (the first ``per_class`` of each class, parasitized first) through the shared
    preprocessing: a uint8 batch at ``size`` px."""
    from device.imageio import read_rgb
    from device.preprocess import prepare_batch

    files = [f for label in ("Parasitized", "Uninfected") for f in sorted((FIX / label).glob("*.webp"))[:per_class]]
    return prepare_batch([read_rgb(f) for f in files], size)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # the fixture cells and one cell of a training patient cut short (a copy interrupted): skipped and listed
    data = tmp_path_factory.mktemp("cells") / "nih_cells"
    shutil.copytree(FIX, data)
    whole = (data / "Uninfected" / "C1_thinF_IMG_20150604_104722_cell_191.webp").read_bytes()
    (data / "Uninfected" / BROKEN).write_bytes(whole[: len(whole) // 3])
    out = tmp_path_factory.mktemp("run")
    r = run_module("train", "--data", str(data), "--out", str(out), "--epochs", "1", "--size", "32",
                   "--width", "4", "--batch", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


BROKEN = "C1_thinF_IMG_20150604_104722_cell_999.webp"


@pytest.mark.slow
def test_one_epoch_smoke_run_writes_every_output(run_dir):
    for name in RUN_OUTPUTS:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "confusion"):
        assert key in m
    assert m["n"] == m["n_parasitized"] + m["n_uninfected"] == 25  # the fixture's validation cells
    assert sum(map(sum, m["confusion"])) == m["n"]
    split = json.loads((run_dir / "split.json").read_text())
    sides = [set(v) for v in split["patients"].values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(sides) for b in sides[i + 1:])
    assert set(split["patients"]["val"]) == {"P106", "P135", "C217"}  # patients.csv's val side
    assert [s["file"] for s in split["skipped"]] == [f"Uninfected/{BROKEN}"] and split["skipped"][0]["reason"]
    assert "--epochs 1" in (run_dir / "command.txt").read_text()
    assert "parasitized" in (run_dir / "classification_report.txt").read_text()


@pytest.mark.slow
def test_exported_model_has_normalisation_but_no_augmentation(run_dir):
    import keras

    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    names = [layer.name for layer in model.layers]
    assert names[1] == "normalise"

    def all_layers(m):  # nested models and Sequentials included
        for layer in m.layers:
            yield layer
            if hasattr(layer, "layers"):
                yield from all_layers(layer)

    # Keras's random layers do nothing in predict(), so equal outputs prove nothing: look at the layers
    kinds = {type(layer).__name__ for layer in all_layers(model)}
    assert not any(k.startswith("Random") for k in kinds), kinds
    assert not any("augment" in n for n in names)


@pytest.mark.slow
def test_early_stopping_without_monitor_cells_is_refused_not_done_on_the_validation_patients(tmp_path):
    """With one training patient there are no early-stopping patients: the fit silently monitored the
    validation patients, whose figures were then reported as held out."""
    import csv

    data = tmp_path / "onepatient"
    shutil.copytree(FIX, data)
    rows = list(csv.DictReader((data / "patients.csv").open()))
    for r in rows:
        if r["split"] != "val":
            r["patient"] = "P999"
    with (data / "patients.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = run_module("train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                   "--monitor-fraction", "0.2", "--average-last", "0", "--schedule", "plateau")
    assert r.returncode == 2 and "left no readable early-stopping cells" in r.stderr
    assert not (tmp_path / "run" / "model.keras").exists()


@pytest.mark.slow
def test_missing_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "Parasitized").mkdir()
    r = run_module("train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--epochs", "1")
    assert r.returncode == 2 and "class folder missing" in r.stderr


@pytest.mark.slow
def test_an_unwritable_out_and_a_one_class_validation_side_are_clear_errors_before_training(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = run_module("train", "--data", str(FIX), "--out", str(blocker), "--epochs", "1")
    assert r.returncode == 2 and "cannot be written" in r.stderr and "Traceback" not in r.stderr
    nocsv = tmp_path / "nocsv"
    shutil.copytree(FIX, nocsv)
    (nocsv / "patients.csv").unlink()  # the seeded split holds out healthy patients only
    r = run_module("train", "--data", str(nocsv), "--out", str(tmp_path / "run"), "--epochs", "1")
    assert r.returncode == 2 and "validation patients hold only one class" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "model.keras").exists()
    # extra data holding validation patients' cells (the whole NIH download given as extra cells): they were
    # trained on, and the "held-out" figures were not held out
    again = tmp_path / "again"
    shutil.copytree(FIX, again)
    (again / "patients.csv").unlink()
    r = run_module("train", "--data", str(FIX), "--extra-data", str(again), "--out", str(tmp_path / "run2"),
                   "--epochs", "1")
    assert r.returncode == 2 and "holds cells of held-out patients" in r.stderr and "P106" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run2" / "model.keras").exists()
    # the same for an early-stopping patient: those choose the epoch and (convert) the threshold
    from train.__main__ import parse_args
    from train.data import list_cells, patient_split

    leak = tmp_path / "leak"  # the early-stopping patients' cells, given again as extra cells
    argv = ["--data", str(FIX), "--extra-data", str(leak), "--out", str(tmp_path / "run3"), "--epochs", "1",
            "--monitor-fraction", "0.3", "--schedule", "plateau", "--average-last", "0"]
    args = parse_args(argv)  # the split this command makes: its seed and shares, defaults included
    files, csv_split = list_cells(FIX)
    split, _ = patient_split(sorted({f.patient for f in files}), csv_split, args.seed, args.val_fraction,
                             args.monitor_fraction)
    held = split["monitor"]
    assert held and not set(held) & set(split["val"])
    for cls in ("Parasitized", "Uninfected"):
        (leak / cls).mkdir(parents=True)
    for f in files:
        if f.patient in held:
            shutil.copy(f.path, leak / f.rel)
    r = run_module("train", *argv)
    assert r.returncode == 2 and "holds cells of held-out patients" in r.stderr, r.stderr[-2000:]
    assert all(p in r.stderr for p in held) and not (tmp_path / "run3" / "model.keras").exists()


@pytest.fixture(scope="module")
def converted(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out", str(out),
                   "--representative", "20", "--max-drop", "1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.slow
def test_the_call_rate_counts_one_healthy_cell_more_than_scored_above_the_chosen_threshold(converted):
    """The threshold is chosen among the held-out healthy cells' own scores (the shipped one sits one int8 step
    above a healthy cell's 0.96170), so those cells undercount the false positives of new ones: the card's
    rate is the Wilson bound of k + 1 in n + 1 (conformal), at its threshold and at every curve row alike."""
    import re

    from device.slide import wilson_interval

    out, _ = converted
    card = json.loads((out / "cellnet_int8.json").read_text())
    rule = card["call_false_positive_rule"]
    k, n = map(int, re.search(r"of (\d+) \+ 1 false positives in (\d+) \+ 1 held-out", rule).groups())
    assert n > 0 and card["call_false_positive_rate"] == wilson_interval(k + 1, n + 1)[1] > wilson_interval(k, n)[1]
    rates = [r["call_false_positive_rate"] for r in sorted(card["operating_curve"], key=lambda r: r["threshold"])]
    assert all(b <= a for a, b in zip(rates, rates[1:], strict=False))  # falls with the threshold (device's check)
    assert min(rates) >= wilson_interval(1, n + 1)[1]  # no row counts fewer than one cell: not even above all
    assert "not the card's call rate, which counts one more" in card["threshold_rule"]


@pytest.mark.slow
def test_a_converted_file_gets_a_new_card_without_being_converted_again(converted, run_dir, tmp_path):
    """--card-for measures an earlier conversion's file again (conversion repeats its bytes on one machine, not on
    another CPU): the same bytes come out, with a card whose every figure is measured as a new conversion's,
    which names the conversion that made the file; a file without its own card beside it is refused."""
    import hashlib

    from device.model_card import load_card

    out, _ = converted
    first = json.loads((out / "cellnet_int8.json").read_text())
    again = tmp_path / "again"
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out", str(again),
                   "--representative", "20", "--max-drop", "1.0", "--card-for", str(out / "cellnet_int8.tflite"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (again / "cellnet_int8.tflite").read_bytes() == (out / "cellnet_int8.tflite").read_bytes()
    card = load_card(again / "cellnet_int8.tflite").data  # the device's own checks pass
    made = card["card_of_an_earlier_conversion"]
    assert made["conversion_command"] == first["conversion_command"] and made["date"] == first["date"]
    assert made["representative"] == first["data"]["representative"] == card["data"]["representative"]
    assert "--card-for" in card["conversion_command"]
    same = {k: v for k, v in card.items() if k not in ("card_of_an_earlier_conversion", "conversion_command", "date",
                                                       "git_commit")}
    assert same == {k: v for k, v in first.items() if k not in ("conversion_command", "date", "git_commit")}
    # a file whose card is not its own (or missing): how it was converted is not known
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "m.tflite").write_bytes((out / "cellnet_int8.tflite").read_bytes())
    (lone / "m.json").write_text(json.dumps({**first, "sha256": hashlib.sha256(b"other").hexdigest()}))
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out",
                   str(tmp_path / "no"), "--representative", "20", "--card-for", str(lone / "m.tflite"))
    assert r.returncode == 2 and "the card beside it is not its own" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "no" / "cellnet_int8.json").exists()
    # nor is a card written naming other views, seed or calibration than the file was converted with...
    for other, said in ((["--views", "2"], "--views 1 (now 2)"), (["--seed", "7"], "--seed 1234 (now 7)"),
                        ([], "--representative 20 (now 1000)")):
        r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out",
                       str(tmp_path / "no"), *(["--representative", "20"] if other else []), *other,
                       "--card-for", str(out / "cellnet_int8.tflite"))
        assert r.returncode == 2 and f"it was converted with {said}: give the same" in r.stderr, r.stderr[-2000:]
    # ...or other members: the file's int8 logit against their float32 one is not what its conversion measured
    (lone / "m.json").write_text(json.dumps({**first, "int8_bias_correction": {
        **first["int8_bias_correction"], "error_sd_after": 3 * first["int8_bias_correction"]["error_sd_after"]}}))
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out",
                   str(tmp_path / "no"), "--representative", "20", "--max-drop", "1.0", "--card-for",
                   str(lone / "m.tflite"))
    assert r.returncode == 2 and "it was not converted from these members" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "no" / "cellnet_int8.json").exists()


@pytest.mark.slow
def test_convert_writes_int8_model_and_a_complete_card(converted, run_dir):
    import csv
    import hashlib

    from device.classifier import CellClassifier

    out, _ = converted
    model, card_path = out / "cellnet_int8.tflite", out / "cellnet_int8.json"
    card = json.loads(card_path.read_text())
    assert card["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()  # not the card's own sha256_of
    assert card["size_bytes"] == model.stat().st_size
    assert card["input"]["dtype"] == "uint8" and card["output"]["dtype"] == "uint8"
    assert card["input"]["shape"] == [1, 32, 32, 3]
    # raw pixels in: the input range is pinned to 0..255
    assert card["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert card["class_order"] == ["uninfected", "parasitized"]
    for key in ("keras", "float32", "int8", "int8_at_threshold"):
        assert 0.0 <= card["metrics"][key]["accuracy"] <= 1.0
    for key in ("threshold_rule", "data", "training_command", "conversion_command", "git_commit", "date"):
        assert card[key]
    assert card["runtimes"]["ai_edge_litert"] == "ok"
    # the curve lists the card's own operating point exactly (it was rounded to 4 digits: another point)
    own = [row for row in card["operating_curve"] if row["threshold"] == card["threshold"]]
    assert len(own) == 1 and own[0]["call_false_positive_rate"] == card["call_false_positive_rate"]
    # only the 20 calibration cells of the training patients were decoded, all of them counted
    assert card["data"]["representative"].startswith("20 training-patient cells")
    # the calibration cells are drawn from the training patients' cells alone, never a held-out patient's
    split = json.loads((run_dir / "split.json").read_text())["patients"]
    with open(FIX / "patients.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert card["data"]["cells"]["train"] == sum(r["patient"] in split["train"] for r in table) > 20
    assert (run_dir / "cellnet_float32.tflite").is_file()  # for comparison, not shipped
    assert not list(out.glob(".*tmp"))  # no temp files left behind
    assert {oct(p.stat().st_mode & 0o777) for p in (model, card_path)} == {"0o644"}  # the service user reads them
    clf = CellClassifier(model)
    assert clf.input_size_px == 32
    assert card["views"]["count"] == 1 and card["views"]["views"] == ["as it is"]
    # the int8 logit's mean error was measured on training cells outside the 20 calibration ones, and taken off
    # when beyond twice its standard error; the float32 model stays the trained one (the Keras model's figures)
    bias = card["int8_bias_correction"]
    assert 0 < bias["cells"] == card["data"]["cells"]["train"] - 20 and bias["error_sd_before"] > 0
    if abs(bias["mean_error_before"]) > 2 * bias["error_sd_before"] / bias["cells"] ** 0.5:
        assert bias["applied"] == -bias["mean_error_before"]
        assert abs(bias["mean_error_after"]) < abs(bias["mean_error_before"])
    else:
        assert bias["applied"] == 0.0 and "mean_error_after" not in bias
    assert card["metrics"]["keras"]["auc"] == pytest.approx(card["metrics"]["float32"]["auc"], abs=1e-3)


@pytest.mark.slow
def test_views_are_averaged_inside_the_converted_model(converted, run_dir, tmp_path):
    """--views 4: the int8 file itself gives each cell the mean logit of its four flips, so the device runs
    it as any other model: a cell, its mirror image and its upside-down copy score alike, which the one-view
    model's do not; the scores follow the Keras model's four-flip mean."""
    import keras

    from device.classifier import CellClassifier

    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out", str(tmp_path),
                   "--representative", "20", "--max-drop", "1.0", "--views", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "cellnet_int8.json").read_text())
    assert card["views"]["count"] == 4
    assert card["views"]["views"] == ["as it is", "mirrored", "upside down", "both flips"]
    assert "--views 4" in card["conversion_command"]
    assert card["int8_bias_correction"]["cells"] > 0  # measured on the four-view model as on any other
    four, one = CellClassifier(tmp_path / "cellnet_int8.tflite"), CellClassifier(converted[0] / "cellnet_int8.tflite")
    x = fixture_cells(four.input_size_px, per_class=10)
    flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]

    def logit(clf, cells):
        p = clf.predict(np.ascontiguousarray(cells))
        return np.log(p / (1 - p))

    spread_four = np.ptp([logit(four, v) for v in flips], axis=0)  # how far the flips of a cell score apart
    spread_one = np.ptp([logit(one, v) for v in flips], axis=0)
    # each branch of the int8 graph has its own calibrated ranges, so the four views of a flipped cell are not
    # rounded exactly as those of the cell: alike to a few output steps, not to the last one
    assert spread_four.max() < 0.25 * spread_one.max()
    # the graph: each view a pass of the whole network (4 times the one-view model's convolutions)
    ops = [[d["op_name"] for d in c.interpreter._get_ops_details()] for c in (four, one)]
    assert ops[0].count("CONV_2D") == 4 * ops[1].count("CONV_2D") > 0
    assert ops[0].count("REVERSE_V2") == 3 and "REVERSE_V2" not in ops[1]  # one flip per view past the first
    # in float, the wrapped model is exactly the mean of the model over the four flips
    from convert.core import with_views

    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    cells = x.astype(np.float32)
    mean = np.mean([model.predict(v.astype(np.float32), verbose=0)[:, 0] for v in flips], axis=0)
    assert np.allclose(with_views(model, 4).predict(cells, verbose=0)[:, 0], mean, rtol=1e-5, atol=1e-6)
    mirrored = np.mean([model.predict(v.astype(np.float32), verbose=0)[:, 0] for v in flips[:2]], axis=0)
    assert np.allclose(with_views(model, 2).predict(cells, verbose=0)[:, 0], mirrored, rtol=1e-5, atol=1e-6)
    assert with_views(model, 1) is model
    # the one-view conversion's float32 model in the run folder is its own still, beside the four-view one
    assert card["float32_model"].endswith("cellnet_views4_float32.tflite")
    from device.classifier import make_interpreter

    floats = {n: make_interpreter(run_dir / n)[0] for n in ("cellnet_float32.tflite", "cellnet_views4_float32.tflite")}
    assert [sum(d["op_name"] == "REVERSE_V2" for d in i._get_ops_details()) for i in floats.values()] == [0, 3]


@pytest.mark.slow
def test_an_ensemble_of_runs_is_one_model_giving_their_mean_logit(converted, run_dir, tmp_path):
    """--model A B: the int8 file gives each cell the mean logit of the two trained runs, each member one pass
    of its network; the card lists the members and their training commands. Members must share the patient
    split (else no patient is held out from both) and the input; the same run twice is refused."""
    import keras

    from convert.core import ConvertError, ensemble
    from device.classifier import CellClassifier, make_interpreter

    second = tmp_path / "run2"
    r = run_module("train", "--data", str(FIX), "--out", str(second), "--epochs", "1", "--size", "32", "--width", "4",
                   "--batch", "16", "--seed", "7")
    assert r.returncode == 0, r.stderr[-3000:]
    members = [run_dir / "model.keras", second / "model.keras"]
    r = run_module("convert", "--model", *map(str, members), "--data", str(FIX), "--out", str(tmp_path / "m"),
                   "--representative", "20", "--max-drop", "1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "m" / "cellnet_int8.json").read_text())
    assert card["members"]["count"] == 2
    assert [m["model"] for m in card["members"]["models"]] == list(map(str, members))
    assert card["training_command"] == [m["training_command"] for m in card["members"]["models"]]
    assert "--seed 7" in card["training_command"][1] and "--seed" not in card["training_command"][0]
    assert card["views"]["count"] == 1
    two = CellClassifier(tmp_path / "m" / "cellnet_int8.tflite")
    one = CellClassifier(converted[0] / "cellnet_int8.tflite")
    ops = [[d["op_name"] for d in c.interpreter._get_ops_details()] for c in (two, one)]
    assert ops[0].count("CONV_2D") == 2 * ops[1].count("CONV_2D") > 0
    # in float the members' mean, exactly; the float32 file is kept apart from the one-model conversion's
    models = [keras.models.load_model(m, compile=False) for m in members]
    x = fixture_cells(32, per_class=8).astype(np.float32)
    logits = [m.predict(x, verbose=0)[:, 0] for m in models]
    assert not np.allclose(logits[0], logits[1], atol=1e-3)  # two seeds: two models
    assert np.allclose(ensemble(models).predict(x, verbose=0)[:, 0], np.mean(logits, axis=0), rtol=1e-5, atol=1e-6)
    assert ensemble(models[:1]) is models[0]
    # in the first member's run folder, named by the ensemble (another ensemble of that run keeps its own)
    float32 = Path(card["float32_model"])
    assert float32.parent == run_dir and float32.name.startswith("cellnet_x2-") and float32.suffix == ".tflite"
    interp, _ = make_interpreter(float32)
    assert sum(d["op_name"] == "CONV_2D" for d in interp._get_ops_details()) == ops[0].count("CONV_2D")
    # (that the int8 ensemble scores the members' mean is checked on real models: the shipped one's members)

    # refusals, exit 2 with nothing written: the same run twice, a member of another split, another input size
    other = tmp_path / "other"
    shutil.copytree(second, other)
    split = json.loads((other / "split.json").read_text())
    split["patients"]["val"], split["patients"]["train"] = split["patients"]["train"][:2], split["patients"]["val"]
    (other / "split.json").write_text(json.dumps(split))
    copied = tmp_path / "copied"  # one run under two folders is still one run
    shutil.copytree(run_dir, copied)
    fields = tmp_path / "crops"  # extra cells with their field split, as train.fieldcrops writes them
    fields.mkdir()
    (fields / "fields_split.json").write_text(json.dumps({"source": "fields", "train": ["a.jpg"], "val": ["b.jpg"]}))
    extra, lost = tmp_path / "extra", tmp_path / "lost"
    for folder, crops in ((extra, fields), (lost, tmp_path / "gone")):
        shutil.copytree(second, folder)
        doc = json.loads((folder / "split.json").read_text())
        (folder / "split.json").write_text(json.dumps({**doc, "extra_data": [str(crops)]}))
    for models_given, message in (([members[0], members[0]], "given twice"),
                                  ([members[0], copied / "model.keras"], "given twice"),
                                  ([members[0], other / "model.keras"], "another patient split"),
                                  ([members[0], extra / "model.keras"], "other extra cells"),
                                  ([lost / "model.keras"], "fields_split.json is missing")):
        out = tmp_path / f"refused-{len(models_given)}-{models_given[-1].parent.name}"
        r = run_module("convert", "--model", *map(str, models_given), "--data", str(FIX), "--out", str(out),
                       "--representative", "20", "--max-drop", "1.0")
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
        assert not list(out.iterdir())
    small = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.Flatten(), keras.layers.Dense(1)])
    with pytest.raises(ConvertError, match="same input"):
        ensemble([models[0], small])


def test_cell_colour_norm_divides_each_channel_by_the_cells_own_mean():
    """--colour-norm's first layer: a real NIH cell's channels over their mean inside the cell (x 0.5), the black
    outside kept black; the same cell under other per-channel gains (another stain, another lamp) gives the
    same input to the network."""
    from train.model import CellColourNorm

    cell = fixture_cells(48, per_class=1)[:1].astype(np.float32) / 255  # the first parasitized cell
    inside = cell.max(axis=-1) > 0
    assert 0.3 < inside.mean() < 0.95
    out = np.asarray(CellColourNorm()(cell))
    expected = 0.5 * cell / cell[inside].mean(axis=0)  # over the cell's pixels only, per channel
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-6)
    assert (out[~inside] == 0).all()
    tinted = cell * np.array([0.8, 1.1, 0.9], np.float32)
    assert np.allclose(np.asarray(CellColourNorm()(tinted)), out, rtol=1e-4, atol=1e-6)
    # an empty square (no cell) is not a division by zero: it stays black
    assert (np.asarray(CellColourNorm()(np.zeros_like(cell))) == 0).all()


@pytest.mark.slow
def test_a_colour_norm_run_converts_to_int8_that_both_runtimes_run(tmp_path):
    """The layer has no division (int8 DIV fails on ai_edge_litert and is missing from tflite_runtime 2.14): the
    converted model passes the runtime gate on both (how closely int8 follows the layer: the next test)."""
    import importlib.util

    import keras

    run = tmp_path / "run"
    r = run_module("train", "--data", str(FIX), "--out", str(run), "--epochs", "1", "--size", "32", "--width", "4",
                   "--batch", "16", "--colour-norm")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_module("convert", "--model", str(run / "model.keras"), "--data", str(FIX), "--out", str(tmp_path / "m"),
                   "--representative", "20", "--max-drop", "1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "m" / "cellnet_int8.json").read_text())
    assert card["runtimes"]["ai_edge_litert"] == "ok"
    if importlib.util.find_spec("tflite_runtime"):
        assert card["runtimes"]["tflite_runtime"] == "ok"
    import train.model  # noqa: F401  (the layer's registration, as convert does)

    model = keras.models.load_model(run / "model.keras", compile=False)
    assert "cell_colour_norm" in [layer.name for layer in model.layers]
    # the colour norm's ops run in float inside the int8 model, the network's in int8; raw pixels in, as always
    assert card["input"]["dtype"] == "uint8" and card["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert card["output"]["dtype"] == "uint8"
    from convert.core import op_outputs

    ops = op_outputs((tmp_path / "m" / "cellnet_int8.tflite").read_bytes())
    norm = [(op, dtype.name) for op, dtype, name in ops if "cell_colour_norm" in name]
    assert {op for op, _ in norm} >= {"REDUCE_MAX", "MEAN", "RSQRT", "MUL"}
    assert {dtype for op, dtype in norm if op != "GREATER"} == {"float32"}
    assert {dtype.name for op, dtype, _ in ops if op in ("CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D")} == {"int8"}


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")  # the converter, on small models
def test_float_nodes_names_every_colour_norm_and_nothing_else(monkeypatch):
    """float_nodes names the colour norm's tensors of every member that has one, and no other layer's; nothing of
    a model without one; a colour norm whose operations it cannot find by name is an error, not a model
    quantised whole. And a converted model whose operations came out of another type than asked is refused."""
    from ai_edge_litert.interpreter import Interpreter

    from convert.core import ConvertError, _check_float_ops, ensemble, float_nodes, op_outputs
    from train.model import build_model

    plain = build_model(32, 4)
    assert float_nodes(plain) == []
    trio = ensemble([build_model(32, 4, colour_norm=True), plain, build_model(32, 4, colour_norm=True)])
    names = float_nodes(trio)
    # the two members' colour norms compute the same thing from the same input (the layer has no weights): the
    # converter computes it once, under the first member's name, for both
    assert {n.split("/")[1] for n in names if "/member_" in n} == {"member_1_1"}
    assert any(n.endswith("/Rsqrt") for n in names) and any(n.endswith("/Mean") for n in names)
    assert not [n for n in names if any(k in n for k in ("conv", "bn", "relu", "pool", "gap", "logit", "normalise"))]
    details = Interpreter.get_tensor_details
    with monkeypatch.context() as m:
        m.setattr(Interpreter, "get_tensor_details", lambda self: [
            {**d, "name": d["name"].replace("cell_colour_norm", "renamed")}
            for d in details(self)])
        with pytest.raises(ConvertError, match="no operation of the colour norm"):
            float_nodes(trio)
    # the post-check: the float32 model is all float, so asking for only the colour norm in float is refused,
    # as is an int8 model asked to keep a convolution in float
    import tensorflow as tf

    f32 = tf.lite.TFLiteConverter.from_keras_model(trio).convert()
    with pytest.raises(ConvertError, match="operations of the wrong type: .*CONV_2D"):
        _check_float_ops(f32, names)
    x = fixture_cells(32, 6)
    from convert.core import representative_images, to_tflite

    int8 = to_tflite(trio, representative_images(x.astype(np.float32)), f32)
    _check_float_ops(int8, names)  # as converted: passes
    conv_out = next(n for _, dtype, n in op_outputs(int8) if "conv0" in n or "relu0" in n)
    with pytest.raises(ConvertError, match="wrong type"):
        _check_float_ops(int8, [*names, conv_out])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")  # the converter, on a bare layer
def test_the_colour_norm_in_int8_follows_the_layer_on_real_cells():
    """The layer alone, converted as convert converts a model (calibrated on real cells plus the one-white-pixel
    range image): its ops run in float, so its int8 model's output on the 57 fixture cells is the float layer's
    rounded to the output's step (0.0008 median, 0.0028 at the 99th percentile, the step 0.0032), but where a
    pixel lies past the calibrated range, which clips it. Computed in int8 it was off by 0.0025 and 0.0083 (and
    without the floor on the rsqrt's input, where the range image stretched 1/mean, a median 0.014)."""
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from convert.core import representative_images, to_tflite
    from train.model import CellColourNorm

    x = fixture_cells(48)
    inp = keras.Input((48, 48, 3))
    layer = keras.Model(inp, CellColourNorm()(keras.layers.Rescaling(1 / 255)(inp)))
    interp = Interpreter(model_content=to_tflite(layer, representative_images(x[::2].astype(np.float32))))
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(i["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(i["index"], x)
    interp.invoke()
    scale, zero = o["quantization"]
    int8 = (interp.get_tensor(o["index"]).astype(np.float32) - zero) * scale
    ref = layer.predict(x.astype(np.float32), verbose=0)
    inside = x.max(axis=-1) > 0
    err = np.abs(int8 - ref)[inside]
    assert 0.5 < ref[inside].max() < 1.5  # cells over their mean, x 0.5: around 0.5
    assert np.median(err) <= 0.5 * scale and np.percentile(err, 99) <= scale  # the output's rounding
    assert (int8[~inside] == 0).all()


@pytest.mark.slow
def test_the_shipped_models_members_are_kept_and_are_the_shipped_model():
    """models/members/ keeps the Keras runs the shipped ensemble was converted from (with their split and
    command), so the model can be converted again: their mean logit is what the shipped int8 file scores,
    to int8 rounding, and the card's training commands are theirs."""
    import keras

    import train.model  # noqa: F401  (registers CellColourNorm)
    from convert.core import ensemble
    from device.classifier import CellClassifier

    shipped = CellClassifier(ROOT / "models" / "cellnet_int8.tflite")
    card = shipped.card.data
    kept = [ROOT / "models" / "members" / Path(m["model"]).parent.name for m in card["members"]["models"]]
    assert [(k / "command.txt").read_text().strip() for k in kept] == [
        m["training_command"] for m in card["members"]["models"]]
    assert all((k / "split.json").is_file() for k in kept)
    models = [keras.models.load_model(k / "model.keras", compile=False) for k in kept]
    x = fixture_cells(shipped.input_size_px)
    mean_logit = ensemble(models).predict(x.astype(np.float32), verbose=0)[:, 0]
    p = shipped.predict(x)
    err = np.log(p / (1 - p)) - mean_logit
    # in logits (a probability near 0.5 moves most per step): within a few of the output's steps (0.11)
    assert np.abs(err).max() < 1.0
    # convert took int8 rounding's mean shift off the logit (+0.15 on these cells before, -0.01 after)
    assert abs(err.mean()) < 0.05
    assert card["int8_bias_correction"]["applied"] < -0.1
    # and neither member alone is what the file scores (they differ from their mean by up to 2.3 here)
    for m in models:
        assert np.abs(m.predict(x.astype(np.float32), verbose=0)[:, 0] - mean_logit).max() > 1.5


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")
def test_the_int8_logits_mean_error_is_taken_off_the_last_bias_and_holds_on_other_cells(monkeypatch):
    """bias_corrected on the shipped pair: int8 rounding raised its logit by about +0.15 on average against
    float32. Measured on half the fixture cells and taken off the members' last bias, the error on the other half
    falls to near zero, the scatter stays, the members' weights come back as they were, and an error of zero
    (the float model measured against itself) is left alone."""
    import keras

    import train.model  # noqa: F401  (registers CellColourNorm)
    from convert.core import bias_corrected, ensemble, representative_images, tflite_logits, to_tflite

    members = [keras.models.load_model(ROOT / "models" / "members" / r / "model.keras", compile=False)
               for r in ("r20rep16", "r20cnrep16")]
    model = ensemble(members)
    x = fixture_cells(48)
    measure, check = x[::2], x[1::2]
    rep = representative_images(x.astype(np.float32))
    f32 = to_tflite(model, None)
    int8 = to_tflite(model, rep, f32)
    before = tflite_logits(int8, check) - tflite_logits(f32, check)
    biases = [m.layers[-1].bias.numpy().copy() for m in members]
    corrected, info = bias_corrected(members, model, rep, f32, int8, measure)
    after = tflite_logits(corrected, check) - tflite_logits(f32, check)
    assert before.mean() > 0.08  # the shift to take out (0.14-0.16 on these cells)
    assert info["cells"] == len(measure) and info["applied"] == pytest.approx(-info["mean_error_before"])
    assert abs(after.mean()) < 0.04 and abs(info["mean_error_after"]) < 0.02
    assert after.std() < 1.3 * before.std()
    assert all(np.array_equal(m.layers[-1].bias.numpy(), b) for m, b in zip(members, biases, strict=True))
    same, info = bias_corrected(members, model, rep, f32, f32, measure)
    assert same is f32 and info["applied"] == 0.0 and info["mean_error_before"] == 0.0
    same, info = bias_corrected(members, model, rep, f32, int8, measure[:0])  # --bias-cells 0
    assert same is int8 and info["cells"] == 0 and info["applied"] == 0.0 and info["how"].startswith("not measured")
    # a conversion that fails midway leaves the members as they were
    import convert.core

    def broken(*a, **k):
        raise RuntimeError("converter failed")

    monkeypatch.setattr(convert.core, "to_tflite", broken)
    with pytest.raises(RuntimeError, match="converter failed"):
        bias_corrected(members, model, rep, f32, int8, measure)
    assert all(np.array_equal(m.layers[-1].bias.numpy(), b) for m, b in zip(members, biases, strict=True))
    # the shift reaches the logit exactly through the ensemble and the views: each averages the members' logits
    from convert.core import with_views

    four = with_views(model, 4)
    before_k = four.predict(check.astype(np.float32), verbose=0)[:, 0]
    for m in members:
        m.layers[-1].bias.assign(m.layers[-1].bias - 0.3)
    after_k = four.predict(check.astype(np.float32), verbose=0)[:, 0]
    np.testing.assert_allclose(before_k - after_k, 0.3, atol=1e-5)


@pytest.mark.slow
def test_bias_cells_zero_converts_without_the_correction(run_dir, converted, tmp_path):
    """--bias-cells 0: no cells drawn, nothing measured, the file as the first conversion made it."""
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out", str(tmp_path),
                   "--representative", "20", "--max-drop", "1.0", "--bias-cells", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "cellnet_int8.json").read_text())
    assert card["int8_bias_correction"]["cells"] == 0 and card["int8_bias_correction"]["applied"] == 0.0
    assert "0 for the int8 bias" in r.stderr
    first = json.loads((converted[0] / "cellnet_int8.json").read_text())
    if first["int8_bias_correction"]["applied"] == 0.0:  # nothing was taken off there either: the same bytes
        assert card["sha256"] == first["sha256"]
    else:
        assert card["sha256"] != first["sha256"]


@pytest.mark.slow
def test_parity_gate_refuses_and_writes_nothing(run_dir, tmp_path):
    out, run = tmp_path / "models", tmp_path / "run"
    run.mkdir()
    for name in ("model.keras", "split.json"):
        shutil.copy(run_dir / name, run / name)
    r = run_module("convert", "--model", str(run / "model.keras"), "--data", str(FIX), "--out", str(out),
                   "--representative", "20", "--max-drop", "-1.0")  # demands int8 beat Keras by 100 points
    assert r.returncode == 2
    assert "parity gate" in r.stderr and "int8 accuracy" in r.stderr and "Keras model" in r.stderr
    assert not list(out.iterdir())
    assert not (run / "cellnet_float32.tflite").exists()  # not even the comparison model (was written first)


@pytest.mark.slow
def test_a_card_that_cannot_be_written_leaves_no_model_behind(run_dir, tmp_path):
    out = tmp_path / "models"
    (out / "cellnet_int8.json").mkdir(parents=True)  # a folder where the card goes
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out", str(out),
                   "--representative", "20", "--max-drop", "1.0")
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cellnet_int8.json"]  # no model without its card


def test_convert_refuses_models_the_device_would_misread(tmp_path):
    import keras

    from convert.core import ConvertError, load_keras

    def save(outputs_fn, shape=(32, 32, 3)):
        inp = keras.Input(shape)
        x = keras.layers.GlobalAveragePooling2D()(inp)
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.keras"
        keras.Model(inp, outputs_fn(x)).save(path)
        return path

    cases = [
        (save(lambda x: keras.layers.Dense(1, activation="sigmoid")(x)), "applies 'sigmoid'"),
        (save(lambda x: keras.layers.Dense(2)(x)), "one output of one logit"),
        (save(lambda x: [keras.layers.Dense(1)(x), keras.layers.Dense(1)(x)]), "one output of one logit"),
        (save(lambda x: keras.layers.Dense(1)(x), shape=(None, None, 3)), "fixed size"),
    ]
    for path, message in cases:
        with pytest.raises(ConvertError, match=message):
            load_keras(path)
    assert load_keras(save(lambda x: keras.layers.Dense(1)(x))).output_shape == (None, 1)


@pytest.mark.slow
def test_convert_bad_inputs_are_clear_errors(run_dir, tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    r = run_module("convert", "--model", str(junk), "--data", str(FIX), "--out", str(tmp_path / "m1"))
    assert r.returncode == 2 and "not a loadable Keras model" in r.stderr
    for flag, value, message in (("--bias-cells", "-1", "0 (no correction) or at least 2"),
                                 ("--bias-cells", "1", "0 (no correction) or at least 2"),
                                 ("--representative", "0", "at least 1")):
        r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX), "--out",
                       str(tmp_path / "m9"), flag, value)
        assert r.returncode == 2 and message in r.stderr and not (tmp_path / "m9").exists()
    # a model without its run's split.json: no re-made split (one took trained-on patients as held out)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "model.keras", lone / "model.keras")
    r = run_module("convert", "--model", str(lone / "model.keras"), "--data", str(FIX), "--out", str(tmp_path / "m0"))
    assert r.returncode == 2 and "split.json not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m0").exists() or not list((tmp_path / "m0").iterdir())
    (tmp_path / "empty" / "Parasitized").mkdir(parents=True)
    (tmp_path / "empty" / "Uninfected").mkdir()
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "m2"))
    assert r.returncode == 2 and "has no images" in r.stderr
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = run_module("convert", "--model", str(run_dir / "model.keras"), "--data", str(FIX),
                   "--out", str(blocker / "models"))
    assert r.returncode == 2 and "cannot be written" in r.stderr


@pytest.mark.slow
def test_field_crops_are_cut_like_the_device_and_join_training(tmp_path):
    import csv

    from device.imageio import read_rgb

    crops = tmp_path / "field_cells"
    r = run_module("train.fieldcrops", "--fields", str(ROOT / "tests" / "fixtures" / "fields"), "--out", str(crops),
                   "--val-fraction", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    with (crops / "patients.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["split"] for r in rows} == {"train", "val"}
    assert sum(r["label"] == "parasitized" for r in rows) >= 3  # the fixture fields box 5 infected cells
    assert sum(r["label"] == "uninfected" for r in rows) > 100
    # one field per side, never both
    sides = {}
    for row in rows:
        sides.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()) and len(sides) == 2
    crop = read_rgb(crops / rows[0]["file"], min_side_px=4)
    assert crop[0, 0].max() == 0 or crop[-1, -1].max() == 0  # NIH form: black outside the cell mask
    assert json.loads((crops / "val_fields" / "annotations.json").read_text())
    run = tmp_path / "run"
    # also the older recipe: early stopping on monitor patients with a plateau schedule
    r = run_module("train", "--data", str(FIX), "--extra-data", str(crops), "--out", str(run), "--epochs", "1",
                   "--size", "32", "--width", "4", "--batch", "32", "--schedule", "plateau", "--average-last", "0",
                   "--monitor-fraction", "0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert str(crops) in metrics["extra_val"]
    assert "extra " in r.stderr and "training cells" in r.stderr and "class weights" in r.stderr
    assert json.loads((run / "split.json").read_text())["patients"]["monitor"]
    assert "val_loss" in json.loads((run / "history.json").read_text())  # the monitor patients were scored
    # only the extra cells of training fields joined training, parasitized ones 16 times over (the default)
    train_rows = [r for r in rows if r["split"] == "train"]
    n_extra = len(train_rows) + 15 * sum(r["label"] == "parasitized" for r in train_rows)
    assert f"extra {crops}: {n_extra} training cells" in r.stderr
    # a run with early-stopping patients: convert chooses its threshold on them, and the card says so
    out = tmp_path / "models"
    c = run_module("convert", "--model", str(run / "model.keras"), "--data", str(FIX), "--out", str(out),
                   "--representative", "20", "--max-drop", "1.0")
    assert c.returncode == 0, c.stderr[-3000:]
    card = json.loads((out / "cellnet_int8.json").read_text())
    assert "early-stopping patients" in card["threshold_rule"]
    assert card["metrics"]["threshold_patients_int8_at_threshold"]["n"] == card["data"]["cells"]["monitor"] > 0
    assert card["data"]["cells"]["monitor"] != card["data"]["cells"]["val"]
    # the run records the field split it trained on, and the card lists those fields
    split_doc = json.loads((crops / "fields_split.json").read_text())
    recorded = json.loads((run / "split.json").read_text())["extra_fields_split"][str(crops.resolve())]
    assert (recorded["train"], recorded["val"]) == (sorted(split_doc["train"]), sorted(split_doc["val"]))
    assert card["data"]["extra_training_data"][0]["train_images"] == split_doc["train"]
    # the crops cut again with another split after training: the card listed the new split's training fields,
    # and evaluate-fields scored fields the model trained on as held out
    (crops / "fields_split.json").write_text(json.dumps({**split_doc, "train": split_doc["val"],
                                                         "val": split_doc["train"], "seed": 7}))
    c = run_module("convert", "--model", str(run / "model.keras"), "--data", str(FIX), "--out",
                   str(tmp_path / "refused"), "--representative", "20", "--max-drop", "1.0")
    assert c.returncode == 2 and "cut again with another field split" in c.stderr, c.stderr[-2000:]
    assert not (tmp_path / "refused" / "cellnet_int8.tflite").exists()


def test_calibration_sample_is_seeded_sorted_and_drawn_from_the_given_files():
    from convert.core import calibration_files

    files = [f"cell_{i:03d}.png" for i in range(200)]
    a, b = calibration_files(files, 20, seed=7), calibration_files(files, 20, seed=7)
    assert a == b and len(a) == 20 and len(set(a)) == 20 and a == sorted(a) and set(a) <= set(files)
    assert calibration_files(files, 20, seed=8) != a
    assert calibration_files(files[:5], 20, seed=7) == files[:5]  # fewer files than asked: all of them


@pytest.mark.slow
def test_all_training_patients_run_has_no_monitor_and_convert_thresholds_on_validation(tmp_path):
    from device.model_card import load_card

    run = tmp_path / "all"
    r = run_module("train", "--data", str(FIX), "--out", str(run), "--epochs", "1", "--size", "32", "--width", "4",
                   "--batch", "16", "--monitor-fraction", "0", "--schedule", "plateau", "--average-last", "0")
    assert r.returncode == 2 and "--schedule cosine" in r.stderr  # nothing to stop early on
    r = run_module("train", "--data", str(FIX), "--out", str(run), "--epochs", "2", "--size", "32", "--width", "4",
                   "--batch", "16", "--monitor-fraction", "0", "--schedule", "cosine", "--weight-decay", "0.004")
    assert r.returncode == 0, r.stderr[-3000:]
    split = json.loads((run / "split.json").read_text())
    assert split["patients"]["monitor"] == []
    train_p, val_p = set(split["patients"]["train"]), set(split["patients"]["val"])
    csv_patients = {line.split(",")[2] for line in (FIX / "patients.csv").read_text().splitlines()[1:]}
    assert train_p | val_p == csv_patients and not train_p & val_p  # every non-validation patient trains
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 2 and not any(k.startswith("val_") for k in history)  # nothing selected
    out = tmp_path / "models"
    r = run_module("convert", "--model", str(run / "model.keras"), "--data", str(FIX), "--out", str(out),
                   "--representative", "20", "--max-drop", "1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    card = load_card(out / "cellnet_int8.tflite").data  # the device's own check of the card passes
    assert "validation patients (the model saw every training patient)" in card["threshold_rule"]
    assert "(validation patients)" in card["call_false_positive_rule"]
    assert card["data"]["patients"]["monitor"] == 0


def test_weight_average_is_the_mean_of_the_last_epochs_weights():
    import keras

    from train.model import WeightAverage, build_model

    keras.utils.set_random_seed(3)
    model = build_model(16, 2)
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).uniform(0, 255, (32, 16, 16, 3)).astype("float32")
    y = np.linspace(-1, 1, 32, dtype="float32")[:, None]
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append([w.numpy() for w in self.model.weights])

    model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[Snapshot(), WeightAverage(start_epoch=2)])
    final = [w.numpy() for w in model.weights]
    assert not np.allclose(snapshots[2][0], snapshots[3][0])  # the weights moved: averaging is not a no-op
    for got, a, b in zip(final, snapshots[2], snapshots[3], strict=True):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-6)
