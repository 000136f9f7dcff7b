"""python -m device analyze / cells on real images, with the bad-input corpus mixed in."""

import json
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
                          timeout=timeout)


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
    assert len(list((tmp_path / "ann").glob("*_annotated.jpg"))) == len(images)


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
