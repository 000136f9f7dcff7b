"""python -m device analyze / cells on real images, with the bad-input corpus mixed in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "device" / "samples"
BAD = ROOT / "tests" / "fixtures" / "bad_inputs"
CELLS = ROOT / "tests" / "fixtures" / "nih_cells"


def device(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "device", *args], cwd=ROOT, capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def test_analyze_fields_writes_json_annotations_and_a_slide_result(tmp_path):
    out = tmp_path / "out.json"
    r = device("analyze", str(SAMPLES), "--json", str(out), "--annotate", str(tmp_path / "ann"), "--slide")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    images = doc["images"]
    assert len(images) == len(list(SAMPLES.glob("*.jpg")))
    for im in images:
        assert {"image", "width", "height", "rejected", "cells", "rbc_count", "infected_count", "timing_ms"} <= set(im)
        assert (im["width"], im["height"]) == (1600, 1200)
        assert im["rejected"] is None and im["rbc_count"] == len(im["cells"]) > 40
        assert im["infected_count"] == sum(c["infected"] for c in im["cells"])
        for c in im["cells"]:
            x, y, w, h = c["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 1600 and y + h <= 1200
            assert 0.0 <= c["p_infected"] <= 1.0
            assert c["infected"] == (c["p_infected"] >= doc["threshold"] - 1e-4)
    slide = doc["slide"]
    assert slide["rbc_count"] == sum(im["rbc_count"] for im in images)
    assert slide["call"] in {"positive", "negative", "not enough cells"}
    assert slide["rbc_per_ul_source"] == "assumed" and slide["fields_used"] == len(images)
    assert "slide:" in r.stdout
    headline = r.stdout.split("slide:")[1]
    if slide["call"] != "positive":  # a negative headline once printed the flagged share as parasites/uL
        assert "detection limit" in headline and "parasitemia" not in headline
    assert len(list((tmp_path / "ann").glob("*_annotated.jpg"))) == len(images)


def test_slide_options_out_of_range_are_refused_before_any_work():
    field = str(sorted(SAMPLES.glob("*.jpg"))[0])
    # --target 0 crashed with ZeroDivisionError after the batch (no JSON); --rbc-per-ul nan wrote NaN
    for opt, bad in (("--target", "0"), ("--target", "-100"), ("--target", "many"), ("--rbc-per-ul", "0"),
                     ("--rbc-per-ul", "-4e6"), ("--rbc-per-ul", "nan"), ("--rbc-per-ul", "inf")):
        r = device("analyze", field, "--slide", opt, bad)
        assert r.returncode == 2 and opt in r.stderr and "Traceback" not in r.stderr, (opt, bad, r.stderr)


def test_bad_files_are_reported_and_the_batch_goes_on(tmp_path):
    d = tmp_path / "mixed"
    shutil.copytree(BAD, d, ignore=shutil.ignore_patterns("*.py"))
    shutil.copy(sorted(SAMPLES.glob("*.jpg"))[0], d / "zz_good.jpg")
    out = tmp_path / "out.json"
    r = device("analyze", str(d), "--json", str(out))
    assert r.returncode == 0, r.stderr
    images = {Path(i["image"]).name: i for i in json.loads(out.read_text())["images"]}
    n_bad = len([p for p in BAD.iterdir() if p.suffix != ".py"])
    assert sum("error" in i for i in images.values()) == n_bad
    assert images["zz_good.jpg"]["rbc_count"] > 40
    assert "Traceback" not in r.stderr
    assert "truncated JPEG" in r.stderr and "over the 50 MP limit" in r.stderr


def test_slide_call_uses_the_false_positive_rate_at_the_threshold_in_use(tmp_path):
    from device.model_card import load_card

    card = load_card(ROOT / "models" / "cellnet_int8.tflite")
    field = sorted(SAMPLES.glob("*.jpg"))[0]
    for threshold, expected in ((None, card.false_positive_rate), ("0.5", card.false_positive_rate_at(0.5))):
        out = tmp_path / "o.json"
        extra = ["--threshold", threshold] if threshold else []
        r = device("analyze", str(field), "--slide", "--json", str(out), *extra)
        assert r.returncode == 0, r.stderr
        assert json.loads(out.read_text())["slide"]["fp_rate_per_cell"] == expected  # as the service does
    assert card.false_positive_rate_at(0.5) > 5 * card.false_positive_rate  # so the two runs differ
    for bad in ("nan", "1.5", "high"):
        r = device("analyze", str(field), "--threshold", bad)
        assert r.returncode == 2 and "--threshold" in r.stderr and "Traceback" not in r.stderr
    r = device("analyze", str(field), "--slide", "--threshold", "0.3")  # below the card's operating curve
    assert r.returncode == 2 and "operating curve" in r.stderr


def test_all_bad_is_a_failure_exit(tmp_path):
    r = device("analyze", str(BAD / "empty.png"))
    assert r.returncode == 1 and "empty file" in r.stderr


def test_blurred_field_is_rejected_with_a_reason(tmp_path):
    import cv2

    img = cv2.imread(str(sorted(SAMPLES.glob("*.jpg"))[0]))
    cv2.imwrite(str(tmp_path / "blurred.jpg"), cv2.GaussianBlur(img, (0, 0), 4))
    out = tmp_path / "o.json"
    r = device("analyze", str(tmp_path / "blurred.jpg"), "--json", str(out))
    assert r.returncode == 0
    im = json.loads(out.read_text())["images"][0]
    assert "out of focus" in im["rejected"] and im["rbc_count"] == 0


def test_cells_command_reports_every_file_and_a_summary(tmp_path):
    out = tmp_path / "cells.json"
    r = device("cells", str(CELLS), "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    n_files = len(list(CELLS.rglob("*.webp")))
    assert len(doc["files"]) == n_files
    assert {"file", "p_infected", "infected"} <= set(doc["files"][0])
    s = doc["summary"]
    assert s["n"] == n_files and set(s) == {"n", "accuracy", "sensitivity", "specificity", "auc", "threshold"}
    assert json.loads(r.stdout.strip().splitlines()[-1]) == s


def test_evaluate_fields_scores_the_classifier_only_on_fields_its_card_does_not_list(tmp_path):
    from device.model_card import load_card

    shipped = json.loads((ROOT / "models" / "cellnet_int8.json").read_text())
    extra = shipped["data"]["extra_training_data"][0]
    listed = load_card(ROOT / "models" / "cellnet_int8.tflite").training_field_images
    assert listed == set(extra["train_images"]) and len(listed) == 40 and not listed & set(extra["held_out_images"])
    fields = ROOT / "tests" / "fixtures" / "fields"
    trained = sorted(p.name for p in (fields / "images").iterdir())[0]
    shutil.copy(ROOT / "models" / "cellnet_int8.tflite", tmp_path / "m.tflite")
    card = {**shipped, "data": {**shipped["data"], "extra_training_data": [{**extra, "train_images": [trained]}]}}
    (tmp_path / "m.json").write_text(json.dumps(card))
    model = str(tmp_path / "m.tflite")
    r = device("evaluate-fields", str(fields), "--model", model, "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["classification"]["n_images"] == 1 and doc["classification_training_fields"]["n_images"] == 1
    assert "On its own training images, not a measurement" in r.stdout
    r = device("evaluate-fields", str(fields), "--model", model, "--json", str(tmp_path / "b.json"),
               "--include-training-fields")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["classification"]["n_images"] == 2 and "classification_training_fields" not in doc


def test_unusable_outputs_are_refused_before_any_work(tmp_path):
    field = str(sorted(SAMPLES.glob("*.jpg"))[0])
    (tmp_path / "a_file").write_text("x")
    r = device("analyze", field, "--json", str(tmp_path))  # a folder, not a file
    assert r.returncode == 2 and "is a folder, not a file" in r.stderr and "Traceback" not in r.stderr
    r = device("analyze", field, "--annotate", str(tmp_path / "a_file"))  # a file, not a folder
    assert r.returncode == 2 and "cannot write to" in r.stderr and "Traceback" not in r.stderr
    r = device("cells", str(CELLS), "--json", str(tmp_path / "a_file" / "x.json"))  # parent is a file
    assert r.returncode == 2 and "cannot write to" in r.stderr and "Traceback" not in r.stderr
    r = device("evaluate-fields", str(ROOT / "tests" / "fixtures" / "fields"), "--json", str(tmp_path))
    assert r.returncode == 2 and "is a folder, not a file" in r.stderr


def test_annotated_copies_of_same_named_fields_do_not_overwrite_each_other(tmp_path):
    field = sorted(SAMPLES.glob("*.jpg"))[0]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(field, tmp_path / d / "field.jpg")
    shutil.copy(field, tmp_path / "a" / "field.png")  # same stem, other format
    ann = tmp_path / "ann"
    (ann / "field_3_annotated.jpg").mkdir(parents=True)  # the third copy cannot be written there
    out = tmp_path / "out.json"
    r = device("analyze", str(tmp_path / "a"), str(tmp_path / "b"), "--annotate", str(ann), "--json", str(out))
    assert r.returncode == 0, r.stderr
    images = json.loads(out.read_text())["images"]
    assert len(images) == 3 and all(im["rbc_count"] > 40 for im in images)  # every field analysed
    written = [im["annotated"] for im in images if "annotated" in im]
    assert sorted(Path(p).name for p in written) == ["field_2_annotated.jpg", "field_annotated.jpg"]
    assert all(Path(p).stat().st_size > 10_000 for p in written)
    assert "cannot write annotated copy" in r.stderr and "field_3_annotated.jpg" in r.stderr


def test_a_field_named_twice_counts_once_on_the_slide(tmp_path):
    field = sorted(SAMPLES.glob("*.jpg"))[0]
    once, twice = tmp_path / "once.json", tmp_path / "twice.json"
    assert device("analyze", str(field), "--slide", "--json", str(once)).returncode == 0
    r = device("analyze", str(field), str(SAMPLES / ".." / "samples" / field.name), str(SAMPLES / field.name),
               "--slide", "--json", str(twice))
    assert r.returncode == 0, r.stderr
    a, b = json.loads(once.read_text()), json.loads(twice.read_text())
    assert len(b["images"]) == 1
    assert b["slide"]["rbc_count"] == a["slide"]["rbc_count"] > 40
    assert "named more than once" in r.stderr


def test_a_pipe_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    r = device("analyze", str(fifo), timeout=120)  # reading it would block forever
    assert r.returncode == 1 and "not a regular file" in r.stderr


def test_evaluate_fields_bad_annotations_are_clear_errors(tmp_path):
    fields = ROOT / "tests" / "fixtures" / "fields"
    broken = tmp_path / "broken"
    shutil.copytree(fields, broken)
    (broken / "annotations.json").write_text('[{"image": "a.png",\n oops}]')
    r = device("evaluate-fields", str(broken), "--no-classifier")
    assert r.returncode == 2 and "invalid JSON at line 2" in r.stderr and "Traceback" not in r.stderr
    (broken / "annotations.json").unlink()
    r = device("evaluate-fields", str(broken), "--no-classifier")
    assert r.returncode == 2 and "no annotations.json" in r.stderr
    r = device("evaluate-fields", str(tmp_path / "nowhere"), "--no-classifier")
    assert r.returncode == 2 and "no annotations.json" in r.stderr
    # one malformed record is reported and skipped; the other image is still scored
    records = json.loads((fields / "annotations.json").read_text())
    assert len(records) == 2
    records[0]["objects"][0].pop("bbox")
    (broken / "annotations.json").write_text(json.dumps(records))
    out = tmp_path / "r.json"
    r = device("evaluate-fields", str(broken), "--no-classifier", "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [row["image"] for row in doc["images"]] == [records[1]["image"]]
    problem = 'annotations.json: object 0 has no "bbox" of 4 numbers'
    assert doc["errors"] == [{"image": records[0]["image"], "error": problem}]
    # nothing evaluated is a failure exit
    (broken / "annotations.json").write_text(json.dumps(records[:1]))
    r = device("evaluate-fields", str(broken), "--no-classifier")
    assert r.returncode == 1


def test_a_file_name_that_is_not_utf8_is_analysed_and_annotated(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    odd = d / os.fsdecode(b"field\xff.jpg")  # bytes a camera or a USB stick can produce
    shutil.copy(sorted(SAMPLES.glob("*.jpg"))[0], odd)
    out = tmp_path / "out.json"
    r = device("analyze", str(d), "--annotate", str(tmp_path / "ann"), "--json", str(out))
    assert r.returncode == 0, r.stderr  # OpenCV's imwrite crashed (SIGSEGV) on such a name
    (im,) = json.loads(out.read_text())["images"]
    assert im["rbc_count"] > 40 and os.path.getsize(im["annotated"]) > 10_000


def test_cells_summary_uses_the_scores_the_verdicts_used(tmp_path, monkeypatch):
    """The summary was computed from the 4-digit rounded scores: a threshold between an int8 score
    (0.978875...) and its rounded copy (0.9789) gave a summary the per-file verdicts contradicted."""
    import cv2
    import numpy as np

    import device.cli as cli

    scale, zp = 0.10655409097671509, 92  # the shipped card's output quantisation
    plan = {"Parasitized/a.png": 128, "Parasitized/b.png": 200, "Uninfected/c.png": 60, "Uninfected/d.png": 128}
    for name, q in plan.items():
        (tmp_path / "cells" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "cells" / name), np.full((40, 40, 3), q, np.uint8))

    class Fake:
        input_size_px, sha256 = 48, "x"
        card = type("Card", (), {"name": "fake"})()

        def __init__(self, threshold):
            self.threshold = threshold

        def predict(self, batch):  # the pixel value stands in for the quantised output
            return 1 / (1 + np.exp(-scale * (batch[:, 0, 0, 0].astype(float) - zp)))

    monkeypatch.setattr(cli, "_classifier", lambda args: Fake(args.threshold))
    out = tmp_path / "out.json"
    assert cli.main(["cells", str(tmp_path / "cells"), "--threshold", "0.9789", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    flags = {Path(f["file"]).name: f["infected"] for f in doc["files"]}
    assert flags == {"a.png": False, "b.png": True, "c.png": False, "d.png": False}  # 0.978875 < 0.9789
    assert doc["summary"]["sensitivity"] == 0.5 and doc["summary"]["specificity"] == 1.0
