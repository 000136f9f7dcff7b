"""The shipped model, its card, the interpreter choice, and the device's refusal of bad models."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device.classifier import CellClassifier, dequantize, make_interpreter, quantize
from device.imageio import read_rgb
from device.model_card import ModelCard, ModelError, load_card
from device.preprocess import prepare_batch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "cellnet_int8.tflite"
FIX = ROOT / "tests" / "fixtures" / "nih_cells"


@pytest.fixture(scope="module")
def clf():
    return CellClassifier(MODEL)


def copy_model(tmp_path) -> Path:
    shutil.copy(MODEL, tmp_path / MODEL.name)
    shutil.copy(MODEL.with_suffix(".json"), tmp_path / MODEL.with_suffix(".json").name)
    return tmp_path / MODEL.name


def test_shipped_model_is_small_int8_with_raw_pixel_input(clf):
    card = clf.card.data
    assert MODEL.stat().st_size <= 1_000_000
    assert card["input"]["dtype"] == "uint8" and card["output"]["dtype"] == "uint8"
    assert card["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert card["input"]["channel_order"] == "RGB"
    lo, hi = 0.5, 0.999
    assert lo <= clf.threshold <= hi


def test_batched_and_single_predictions_agree_on_real_cells(clf):
    files = sorted((FIX / "Parasitized").iterdir())[:5] + sorted((FIX / "Uninfected").iterdir())[:70]
    files = [f for f in files if f.suffix == ".webp"]
    batch = prepare_batch([read_rgb(f) for f in files], clf.input_size_px)
    p_all = clf.predict(batch)  # the whole set in one call
    p_one = np.array([clf.predict(batch[i : i + 1])[0] for i in range(len(batch))])
    assert p_all.shape == (len(files),) and np.allclose(p_all, p_one)
    small = CellClassifier(MODEL, max_batch=16)  # chunked, the last chunk shorter
    assert np.allclose(small.predict(batch), p_all)
    assert ((p_all >= 0) & (p_all <= 1)).all()
    assert clf.predict(batch[:0]).shape == (0,)


def test_one_classifier_serves_several_threads(clf):
    """Resizing the interpreter for one thread's batch while another's was in it raised RuntimeError ("at
    least 1 reference to internal data"): 7 of 18 calls from three threads failed."""
    from concurrent.futures import ThreadPoolExecutor

    files = [f for f in sorted((FIX / "Uninfected").iterdir()) + sorted((FIX / "Parasitized").iterdir())
             if f.suffix == ".webp"]
    batch = prepare_batch([read_rgb(f) for f in files], clf.input_size_px)
    sizes = [3, 17, len(batch), 1, 9, 30] * 4  # every call a different batch size: the interpreter resizes
    alone = [clf.predict(batch[:n]) for n in sizes]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda n: clf.predict(batch[:n]), sizes))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


def test_wrong_input_shape_is_refused(clf):
    with pytest.raises(ValueError, match="expected"):
        clf.predict(np.zeros((1, 10, 10, 3), np.uint8))


def test_dequantize_formula_and_no_uint8_wraparound():
    q = np.array([0, 150, 255], np.uint8)
    assert dequantize(q, 0.5, 150).tolist() == [-75.0, 0.0, 52.5]
    assert quantize(np.array([-80.0, 0.0, 100.0]), 0.5, 150, np.uint8).tolist() == [0, 150, 255]


def test_missing_card_is_refused(tmp_path):
    m = copy_model(tmp_path)
    m.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="model card missing"):
        CellClassifier(m)


def test_sha256_mismatch_is_refused(tmp_path):
    # a card naming another file's sha256: the model itself still loads, so only the check can refuse it
    # (a corrupted model failed to load anyway, and "sha256" matched this test's own folder name)
    m = copy_model(tmp_path)
    card = json.loads(m.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    m.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="the model file was changed or corrupted"):
        CellClassifier(m)


def test_the_shipped_model_tells_parasitized_fixture_cells_from_uninfected_ones(clf):
    """What p_infected means, end to end on real NIH cells: the parasitized ones score high, the uninfected
    ones low (a sign or class-order slip read every score the wrong way round and passed the other tests).
    Measured: 18 of 22 parasitized flagged at the card's threshold, 0 of 35 uninfected, AUC 0.995."""
    from device.imageio import iter_image_files
    from device.metrics import roc_auc

    p = {cls: clf.predict(prepare_batch([read_rgb(f) for f in iter_image_files([FIX / cls])], clf.input_size_px))
         for cls in ("Parasitized", "Uninfected")}
    assert len(p["Parasitized"]) == 22 and len(p["Uninfected"]) == 35
    assert (p["Parasitized"] >= clf.threshold).sum() >= 16 and (p["Uninfected"] >= clf.threshold).sum() == 0
    assert np.median(p["Parasitized"]) > 0.99 and np.median(p["Uninfected"]) < 0.1
    y = np.r_[np.ones(22, bool), np.zeros(35, bool)]
    assert roc_auc(y, np.r_[p["Parasitized"], p["Uninfected"]]) > 0.98


def test_input_details_contradicting_the_card_are_refused(tmp_path):
    m = copy_model(tmp_path)
    card = json.loads(m.with_suffix(".json").read_text())
    card["input"]["shape"] = [1, 96, 96, 3]
    m.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="input contradicts its card.*shape"):
        CellClassifier(m)
    card["input"]["shape"] = load_card(MODEL).data["input"]["shape"]
    card["input"]["quantization"] = {"scale": 0.98, "zero_point": 0}
    m.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="quantisation"):
        CellClassifier(m)


def _set(path: str, value):
    def edit(card: dict) -> bytes:
        *parents, key = path.split(".")
        node = card
        for k in parents:
            node = node[k]
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value
        return json.dumps(card).encode()
    return edit


_DELETE = object()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda card: json.dumps(card).replace("RGB", "RVB").encode("utf-16"), "model card unreadable"),
    (lambda card: b"null", "expected a JSON object, got NoneType"),
    (_set("threshold", "abc"), "threshold 'abc' is not a number in"),
    (_set("threshold", None), "threshold None is not a number in"),
    (lambda card: json.dumps({**card, "threshold": float("nan")}).encode(), "threshold nan is not a number in"),
    (_set("input.shape", _DELETE), "input.shape: expected a list of whole numbers"),
    (_set("output", "logit"), "output: expected an object"),
    (_set("output.quantization", {"scale": "x", "zero_point": 0}), "output.quantization: expected numbers"),
    # read as int(): 84.9 passed as the model's 84
    (_set("output.quantization.zero_point", 84.9), "output.quantization.zero_point 84.9: expected a whole"),
    # what the card must say beside the tensors: without them nobody can tell what the device runs
    (_set("metrics", _DELETE), "lacks metrics"),
    (_set("data", _DELETE), "lacks data"),
    (_set("git_commit", _DELETE), "lacks git_commit"),
    (_set("git_commit", ""), "git_commit '': expected the commit"),
    (_set("metrics", []), "metrics: expected an object"),
    (_set("data", {}), "data: expected an object"),
    # a missing kind read the logit as a probability (clipped to 0-1): 3 more cells flagged, scores 0 or 1
    (_set("output.kind", _DELETE), "output.kind None is not 'logit' or 'probability'"),
    (_set("output.kind", "Logit"), "output.kind 'Logit' is not"),
    (_set("output.shape", [1, 2]), r"output.shape \[1, 2\] is not \[batch, 1\]"),
    (_set("operating_curve", [{"call_false_positive_rate": 0.01}]), "operating_curve: expected rows"),
    # without a curve an edited threshold or rate could not be caught
    (_set("operating_curve", _DELETE), "operating_curve missing"),
    (_set("operating_curve", []), "operating_curve missing"),
    (_set("call_false_positive_rate", -0.1), "call_false_positive_rate -0.1 is not a rate"),
    # edits that keep the model's sha256 but change every slide call (a flagged cell or two made positive)
    (_set("call_false_positive_rate", 0), "call_false_positive_rate 0 is not an upper bound"),
    (_set("threshold", 0.5), "disagrees with the operating curve"),
    # edited within one step of the curve (~0.01): the rate kept lay between its neighbours' rows and passed (on
    # an earlier card 0.00409 where the validation cells gave 0.00637 at 0.970: a healthy slide positive 6% of the time)
    (_set("threshold", 0.970), "threshold 0.97 disagrees with the operating curve: it has no row"),
    (_set("threshold", 0.3), "lies below the operating curve"),
    (_set("call_false_positive_rate", 0.0004), "disagrees with the operating curve"),
    (_set("output.kind", "probability"), "says probability, but the output spans"),
    # the output read as p_infected would be p(uninfected)
    (_set("class_order", ["parasitized", "uninfected"]), "class order"),
    # the device feeds RGB, NHWC, made by prepare_cell: a card asking for anything else was accepted and fed
    # RGB all the same (a BGR card's model scored three parasitized cells infected: nothing showed it)
    (_set("input.channel_order", "BGR"), "input.channel_order 'BGR' is not 'RGB'"),
    (_set("input.channel_order", _DELETE), "input.channel_order None is not 'RGB'"),
    (_set("input.layout", "NCHW"), "input.layout 'NCHW' is not 'NHWC'"),
    (_set("input.preprocessing", "train.other_resize: stretched"), "input.preprocessing .* does not name"),
    (_set("input.preprocessing", _DELETE), "input.preprocessing None does not name"),
    (_set("input.shape", [1, 48, 48, 1]), r"input.shape \[1, 48, 48, 1\] is not \[batch, side, side, 3\]"),
    (_set("input.dtype", "int8"), "input contradicts its card.*dtype uint8 vs card int8"),
    (lambda card: json.dumps({**card, "operating_curve": card["operating_curve"] * 2}).encode(),
     "operating_curve: thresholds repeat"),
    (lambda card: json.dumps({**card, "operating_curve": [
        {**r, "call_false_positive_rate": 0.5} if i == len(card["operating_curve"]) - 1 else r
        for i, r in enumerate(sorted(card["operating_curve"], key=lambda r: r["threshold"]))]}).encode(),
     "the false-positive rate rises with the threshold"),
])
def test_malformed_cards_are_model_errors_not_crashes(tmp_path, edit, message):
    m = copy_model(tmp_path)
    card = json.loads(m.with_suffix(".json").read_text())
    m.with_suffix(".json").write_bytes(edit(card))
    with pytest.raises(ModelError, match=message):
        CellClassifier(m)  # the service shows "model unusable" on ModelError; anything else was a traceback


def test_the_card_threshold_uses_the_cards_false_positive_rate_not_a_rounded_curve_row(tmp_path):
    shipped = load_card(MODEL)
    assert shipped.threshold in [r["threshold"] for r in shipped.data["operating_curve"]]  # listed exactly
    # A card written before that listed only rounded thresholds (0.9789 for 0.978875...):
    model = copy_model(tmp_path)
    old = json.loads(model.with_suffix(".json").read_text())
    rows = sorted((r for r in old["operating_curve"] if r["threshold"] != old["threshold"]),
                  key=lambda r: r["threshold"])
    # the rounded row just below the threshold may lie below a healthy cell's score, and so count one more
    # false positive than the threshold does (0.9789 did): as the first lower row with a higher rate reads
    i = max(k for k, r in enumerate(rows) if r["threshold"] <= old["threshold"])
    higher = next(r for r in reversed(rows[:i]) if r["call_false_positive_rate"] > old["call_false_positive_rate"])
    rows[i] = {**rows[i], "call_false_positive_rate": higher["call_false_positive_rate"]}
    old["operating_curve"] = rows
    model.with_suffix(".json").write_text(json.dumps(old))
    # its rate could not be checked against a row (an edited threshold looks the same): refused
    with pytest.raises(ModelError, match="no row at that threshold .*convert the model again"):
        load_card(model)
    card = ModelCard(model.with_suffix(".json"), old)  # as such a card's figures read
    rows = card.data["operating_curve"]
    below = max((r for r in rows if r["threshold"] <= card.threshold), key=lambda r: r["threshold"])
    assert below["call_false_positive_rate"] > card.false_positive_rate  # the trap: a lower, rounded row
    assert card.false_positive_rate_at(card.threshold) == card.false_positive_rate
    row_05 = next(r for r in rows if r["threshold"] == 0.5)
    assert card.false_positive_rate_at(0.5) == row_05["call_false_positive_rate"]


def test_an_out_of_range_threshold_override_is_refused():
    for bad in (float("nan"), 1.5, 0.0):
        with pytest.raises(ValueError, match="not a probability"):
            CellClassifier(MODEL, threshold=bad)


def test_missing_and_corrupt_model_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model file missing"):
        CellClassifier(tmp_path / "none.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="no TFLite runtime could load"):
        make_interpreter(bad)


@pytest.mark.parametrize("runtime", ["ai_edge_litert", "tflite_runtime"])
def test_shipped_model_runs_on_each_deployed_runtime(runtime):
    """The runtime gate: the int8 model loads and runs on ai-edge-litert and on tflite-runtime 2.14."""
    pytest.importorskip(runtime)
    code = (
        "import sys, numpy as np\n"
        "from device.classifier import make_interpreter\n"
        f"i, rt = make_interpreter({str(MODEL)!r}, 1, runtimes=({runtime!r},))\n"
        "d = i.get_input_details()[0]\n"
        "i.set_tensor(d['index'], np.full(d['shape'], 128, d['dtype'])); i.invoke()\n"
        "print(rt, i.get_tensor(i.get_output_details()[0]['index']).shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(runtime)


def test_device_never_imports_tensorflow():
    code = (
        "import sys\n"
        "import device.cli, device.analysis, device.classifier, device.slide, device.config\n"
        "from device.classifier import CellClassifier\n"
        f"CellClassifier({str(MODEL)!r})\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


def test_the_output_kind_is_checked_against_what_the_quantised_output_can_express():
    """A probability output cannot leave 0..1; a logit's range can sit wholly below 0 (an undertrained
    model's calibration logits were all negative, and convert was refused with a traceback)."""
    from device.model_card import ModelCard, check_details

    card = load_card(MODEL)
    spec = card.data["output"]

    def detail(scale, zero_point):
        return {"shape": [1, 1], "dtype": np.uint8, "quantization": (scale, zero_point)}

    def with_output(kind, scale, zero_point):
        out = {**spec, "kind": kind, "quantization": {"scale": scale, "zero_point": zero_point}}
        return ModelCard(card.path, {**card.data, "output": out})

    check_details(with_output("logit", 0.36 / 255, 255), "output", detail(0.36 / 255, 255))  # -0.36..0
    check_details(with_output("logit", 0.1066, 92), "output", detail(0.1066, 92))  # the shipped one
    check_details(with_output("probability", 1 / 255, 0), "output", detail(1 / 255, 0))
    with pytest.raises(ModelError, match="says logit, but the output spans 0.00..1.00"):
        check_details(with_output("logit", 1 / 255, 0), "output", detail(1 / 255, 0))
    with pytest.raises(ModelError, match="says probability, but the output spans"):
        check_details(with_output("probability", 0.1066, 92), "output", detail(0.1066, 92))


@pytest.mark.parametrize("towards", [0.0, np.inf])
def test_a_last_bit_of_the_sigmoid_never_moves_a_cell_across_a_card_threshold(monkeypatch, towards):
    """numpy's exp rounds the last bit differently on an x86-64 CPU with AVX-512 and on a Pi's ARM core (20 of
    the shipped model's 256 output codes score one ulp apart). The card's threshold is the score of one code:
    one ulp lower on another CPU, a cell at exactly that code would not be flagged there. Here every score
    comes out one ulp off, as another CPU's may: every code keeps its verdict at every card threshold."""
    def verdicts(c: CellClassifier) -> dict[float, np.ndarray]:
        curve = [r["threshold"] for r in c.card.data["operating_curve"]]
        return {t: c._p_of_code >= t for t in [c.card.threshold, *curve]}

    here = CellClassifier(MODEL)
    codes = np.arange(256)
    sigmoid_here = here._to_probability(codes)
    sigmoid = CellClassifier._to_probability
    monkeypatch.setattr(CellClassifier, "_to_probability", lambda self, raw: np.nextafter(sigmoid(self, raw), towards))
    other = CellClassifier(MODEL)
    assert (other._to_probability(codes) != sigmoid_here).all()
    own = np.flatnonzero(here._p_of_code == here.card.threshold)  # the threshold is the score of one code
    assert len(own) == 1 and other._p_of_code[own[0]] == here.card.threshold
    mine, theirs = verdicts(here), verdicts(other)
    assert mine.keys() == theirs.keys() and all((mine[t] == theirs[t]).all() for t in mine)
    assert np.abs(other._p_of_code - here._p_of_code).max() < 1e-15  # scores elsewhere agree to an ulp
    assert not other._p_of_code.flags.writeable


class _CodesOut:
    """An interpreter whose output is the given codes, one per cell: what predict makes of each code."""

    def __init__(self, codes: np.ndarray):
        self.codes, self.done, self.n = codes, 0, 0

    def set_tensor(self, index, value):
        self.done += self.n
        self.n = len(value)

    def invoke(self):
        pass

    def resize_tensor_input(self, index, shape):
        pass

    def allocate_tensors(self):
        pass

    def get_tensor(self, index):
        return self.codes[self.done : self.done + self.n, None].copy()


@pytest.mark.parametrize("dtype, zero_point", [(np.uint8, 92), (np.int8, -36)])
def test_predict_reads_each_output_code_s_score_from_the_table(dtype, zero_point):
    """Every code of a uint8 or an int8 output (where a code below 0 must not wrap around the table) gets
    its own score, the sigmoid of its logit; the card threshold's code gets the threshold exactly."""
    c = CellClassifier(MODEL, max_batch=100)
    scale = c._out_q[0]
    c._out_q = (scale, zero_point)
    c._p_of_code = c._score_table(np.dtype(dtype))
    info = np.iinfo(dtype)
    codes = np.arange(info.min, info.max + 1).astype(dtype)[::-1]  # in chunks of 100, highest first
    c.interpreter = _CodesOut(codes)
    p = c.predict(np.zeros((len(codes), c.input_size_px, c.input_size_px, 3), np.uint8))
    logits = scale * (codes.astype(np.int64) - zero_point)
    assert np.allclose(p, 1 / (1 + np.exp(-logits)), rtol=1e-15, atol=0)
    assert p[codes == zero_point] == 0.5 and np.all(np.diff(p) < 0)
    at_threshold = np.abs(p - c.card.threshold) <= 8 * np.spacing(c.card.threshold)
    assert p[at_threshold].tolist() == [c.card.threshold]  # the code of logit 36 * scale, 128 or 0
