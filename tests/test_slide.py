"""Slide statistics: Wilson interval, parasites/uL, the call and its false-positive cutoff."""

import math

import pytest

from device.slide import positive_cutoff, summarize_slide, wilson_interval


def test_wilson_interval_known_values():
    # Reference: k=5, n=2000 -> 0.107%..0.584% (Wilson score, z=1.96)
    lo, hi = wilson_interval(5, 2000)
    assert lo == pytest.approx(0.001068, abs=2e-6) and hi == pytest.approx(0.005839, abs=2e-6)
    lo, hi = wilson_interval(0, 1000)
    assert lo == 0.0 and hi == pytest.approx(0.003827, abs=2e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # one cell in 100 (worked by hand: centre 0.028127, half-width 0.026361): the lower bound is above 0
    lo, hi = wilson_interval(1, 100)
    assert lo == pytest.approx(0.001767, abs=2e-6) and hi == pytest.approx(0.054488, abs=2e-6)


def test_cutoff_keeps_a_healthy_slide_negative():
    # A parasite-free slide of n cells yields Poisson(n * fp) false positives; the cutoff must be
    # reached with probability < 0.1%.
    for n, fp in [(2000, 0.003), (2000, 0.001), (5000, 0.01)]:
        k = positive_cutoff(n, fp)
        lam = n * fp
        tail = 1 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(k))
        tail_before = 1 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(k - 1))
        assert tail < 0.001 <= tail_before
    assert positive_cutoff(2000, 0.0) == 1


def test_cutoff_returns_for_a_large_expected_false_positive_count():
    # e^-lam underflows to 0.0 beyond lam ~745: a running product of it once looped forever (a long
    # slide on the device; a degenerate model's threshold search in convert).
    lam = 200_000 * 0.005  # 1,000 expected false positives
    k = positive_cutoff(200_000, 0.005)
    assert lam + 3.0 * math.sqrt(lam) < k < lam + 3.3 * math.sqrt(lam)  # Poisson tail: z(0.999) = 3.09
    assert positive_cutoff(2000, 1.0) == 2001  # every healthy cell flagged: no count can be a call
    assert positive_cutoff(2000, 0.003) == 16  # small counts unchanged (hand check: Poisson(6) tail)


def test_negative_slide_stays_negative_and_positive_is_positive():
    neg = summarize_slide(2100, 6, threshold=0.9, fp_rate_per_cell=0.003)  # 6 ~ expected false positives
    assert neg.call == "negative"
    pos = summarize_slide(2100, 40, threshold=0.9, fp_rate_per_cell=0.003)
    assert pos.call == "positive" and pos.call_reason.startswith("40 cells flagged infected in 2100:")


def test_not_enough_cells_until_the_target():
    s = summarize_slide(800, 2, threshold=0.9, fp_rate_per_cell=0.003, target_rbc=2000)
    assert s.call == "not enough cells" and s.progress == pytest.approx(0.4)


def test_parasites_per_ul_assumed_or_measured():
    s = summarize_slide(2000, 20, threshold=0.9, fp_rate_per_cell=0.0)
    assert s.parasitemia_pct == pytest.approx(1.0)
    assert s.parasites_per_ul == pytest.approx(50_000) and s.rbc_per_ul_source == "assumed"
    lo, hi = s.ci95_pct
    assert lo < 1.0 < hi
    m = summarize_slide(2000, 20, threshold=0.9, fp_rate_per_cell=0.0, rbc_per_ul=4.0e6)
    assert m.parasites_per_ul == pytest.approx(40_000) and m.rbc_per_ul_source == "measured"
    # the interval in parasites/uL is the parasitemia's, on the same RBC count
    assert m.ci95_per_ul == pytest.approx((m.ci95_pct[0] / 100 * 4.0e6, m.ci95_pct[1] / 100 * 4.0e6))
    assert s.ci95_per_ul == pytest.approx((lo / 100 * 5.0e6, hi / 100 * 5.0e6))


def test_expected_false_positives_are_those_of_the_cells_counted_so_far():
    s = summarize_slide(500, 1, threshold=0.979, fp_rate_per_cell=0.004, target_rbc=2000)
    assert s.expected_false_positives == pytest.approx(2.0)  # 500 x 0.004, not the target's 8
    assert s.call == "not enough cells" and "500 of 2000" in s.call_reason


def test_detection_limit_follows_the_cutoff_and_count():
    # Hand-worked with the Poisson tail (scipy.stats.poisson.sf): at 0.3% false positives, 2,000 cells
    # expect 6 (P(X >= 16) = 0.00051 < 0.001 <= P(X >= 15) = 0.0014) and 8,000 cells expect 24
    # (P(X >= 41) = 0.00099, P(X >= 40) = 0.0017): the limit is 16/2000 = 0.8% and 41/8000 = 0.5125%.
    s = summarize_slide(2000, 0, threshold=0.9, fp_rate_per_cell=0.003)
    assert s.positive_cutoff_cells == 16
    assert s.detection_limit_pct == pytest.approx(0.8)
    assert s.detection_limit_per_ul == pytest.approx(0.008 * 5e6)
    more = summarize_slide(8000, 0, threshold=0.9, fp_rate_per_cell=0.003)
    assert more.positive_cutoff_cells == 41
    assert more.detection_limit_pct == pytest.approx(0.5125)  # counting on lowers the limit
    # below the target the limit is the target's: what the count will reach, not what it has
    fewer = summarize_slide(500, 0, threshold=0.9, fp_rate_per_cell=0.003)
    assert fewer.detection_limit_pct == pytest.approx(0.8)
    assert s.to_json()["ci95_pct"] == list(s.ci95_pct)


def test_detection_limit_fraction_balances_false_positives_and_sensitivity():
    from device.slide import detection_limit_fraction

    # no false positives: one cell at full sensitivity -> 1/n
    assert detection_limit_fraction(0.0, 1.0, 2000) == pytest.approx(1 / 2000)
    # false positives too rare to expect one (0.0002 in 200 cells; one flagged cell is a call): still one
    # parasite cell needed, not 0.9998 of one
    assert positive_cutoff(200, 1e-6) == 1
    assert detection_limit_fraction(1e-6, 0.8, 200) == pytest.approx(1 / (200 * 0.8), rel=1e-9)
    # more false positives or less sensitivity both raise the limit
    assert detection_limit_fraction(0.005, 0.9, 2000) > detection_limit_fraction(0.001, 0.9, 2000)
    assert detection_limit_fraction(0.001, 0.5, 2000) > detection_limit_fraction(0.001, 0.9, 2000)
    assert detection_limit_fraction(0.001, 0.0, 2000) == float("inf")


def test_threshold_choice_avoids_both_extremes():
    import numpy as np

    from convert.core import choose_threshold

    rng = np.random.default_rng(0)
    # healthy cells mostly low, a few confidently wrong (label noise); parasitized mostly high
    neg = np.concatenate([rng.uniform(0, 0.6, 990), [0.97, 0.985, 0.99, 0.995, 0.999]])
    pos = np.concatenate([rng.uniform(0.9, 1.0, 900), rng.uniform(0.0, 0.9, 100)])
    p = np.concatenate([neg, pos])
    y = np.concatenate([np.zeros(len(neg), int), np.ones(len(pos), int)])
    t, limit = choose_threshold(p, y, 2000, 0.5, 0.999)
    assert 0.55 <= t <= 0.97  # at the top of the healthy bulk, below the noisy tail
    assert 0 < limit < 0.02
    # the documented rule, worked out apart from this code (a mutation audit): of the thresholds within 10% of
    # the lowest limit, the lowest one, with the upper 95% bound of the false-positive rate. The highest of
    # them would be 0.9048, the lowest limit itself 0.6056, the point false-positive rate 0.5997.
    assert t == pytest.approx(0.598326, abs=1e-5)


def test_the_parity_gate_refuses_an_int8_model_half_a_point_below_keras():
    from convert.core import parity_problem

    problem = parity_problem({"accuracy": 0.9756}, {"accuracy": 0.9700}, 0.005)
    assert problem and "int8 accuracy 0.9700" in problem and "0.9756" in problem
    assert parity_problem({"accuracy": 0.9756}, {"accuracy": 0.9710}, 0.005) is None
    assert parity_problem({"accuracy": 0.9756}, {"accuracy": 0.9800}, 0.005) is None


def test_card_false_positive_rate_at_other_thresholds():
    from pathlib import Path

    from device.model_card import ModelCard

    card = ModelCard(Path("x.json"), {"threshold": 0.9, "call_false_positive_rate": 0.004, "operating_curve": [
        {"threshold": 0.5, "call_false_positive_rate": 0.02, "sensitivity": 0.97},
        {"threshold": 0.9, "call_false_positive_rate": 0.004, "sensitivity": 0.9},
        {"threshold": 0.99, "call_false_positive_rate": 0.001, "sensitivity": 0.6}]})
    assert card.false_positive_rate == 0.004
    assert card.false_positive_rate_at(0.95) == 0.004  # the cautious side: the row below
    assert card.false_positive_rate_at(0.99) == 0.001
    assert card.false_positive_rate_at(0.6) == 0.02


def test_an_early_positive_call_uses_the_targets_cutoff_so_looking_often_adds_no_false_alarms():
    fp = 0.00409  # a card's bound (the shipped card's until 2026-12-01)
    cutoff = positive_cutoff(2000, fp)
    # 10 flagged in 500 cells was "positive" (cutoff at 500 cells) and the same slide at 18 in 2,000
    # "negative"; its page said "19 flagged cells make a positive call" beside POSITIVE with 10
    early = summarize_slide(500, 10, threshold=0.98, fp_rate_per_cell=fp)
    assert early.call == "not enough cells" and early.positive_cutoff_cells == cutoff
    at_cutoff = summarize_slide(500, cutoff, threshold=0.98, fp_rate_per_cell=fp)
    assert at_cutoff.call == "positive" and f"positive from {cutoff} cells" in at_cutoff.call_reason
    # below the target the count only grows and the cutoff stays put, so the call can be looked at
    # after every field: P(a parasite-free slide ever reads positive by 2,000 cells) = P(X_2000 >= cutoff)
    for n in range(100, 2000, 100):
        for k in range(0, 40):
            if summarize_slide(n, k, threshold=0.98, fp_rate_per_cell=fp).call == "positive":
                assert summarize_slide(2000, k, threshold=0.98, fp_rate_per_cell=fp).call == "positive"
    lam = 2000 * fp
    tail = 1 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(cutoff))
    assert tail < 0.001


def test_a_confirmed_parasite_makes_the_call_while_the_review_is_partial():
    fp = 0.00409
    # 8 flagged, 5 confirmed by a person, 3 not yet reviewed: was "negative" (8 < the allowance of 19)
    s = summarize_slide(2000, 8, threshold=0.98, fp_rate_per_cell=fp, confirmed_count=5)
    assert s.call == "positive" and "5 flagged cells confirmed as parasites" in s.call_reason
    one = summarize_slide(2000, 8, threshold=0.98, fp_rate_per_cell=fp, confirmed_count=1)
    assert "1 flagged cell confirmed as a parasite by review" in one.call_reason
    assert "infected in" not in one.call_reason  # the count beside it held cells nobody had confirmed
    # nothing confirmed: the allowance applies to the cells not yet reviewed
    assert summarize_slide(2000, 17, threshold=0.98, fp_rate_per_cell=fp).call == "negative"
    assert summarize_slide(2000, 25, threshold=0.98, fp_rate_per_cell=fp).call == "positive"
    with pytest.raises(ValueError, match="confirmed"):
        summarize_slide(2000, 3, threshold=0.98, fp_rate_per_cell=fp, confirmed_count=4)


@pytest.mark.parametrize("kw", [{"target_rbc": 0}, {"target_rbc": -1}, {"rbc_per_ul": 0.0},
                                {"rbc_per_ul": -4e6}, {"rbc_per_ul": float("nan")}, {"rbc_per_ul": float("inf")}])
def test_impossible_targets_and_rbc_counts_are_refused(kw):
    # target 0 divided by zero; target -1 called any slide negative; rbc_per_ul 0 became "assumed 5e6"
    with pytest.raises(ValueError):
        summarize_slide(100, 1, threshold=0.9, fp_rate_per_cell=0.003, **kw)


@pytest.mark.parametrize("n, k", [(10, 20), (-5, 0), (0, 1), (100, -1)])
def test_impossible_counts_are_refused(n, k):
    # 20 infected in 10 cells raised a math error in the interval; -5 cells gave a parasitemia of -0.0%
    with pytest.raises(ValueError, match="infected cells"):
        summarize_slide(n, k, threshold=0.9, fp_rate_per_cell=0.003)


def test_a_negative_call_with_more_flags_than_expected_says_it_is_below_the_cutoff():
    # 3 flagged with 1.4 expected was "within the 1.4 false positives expected": it is not
    s = summarize_slide(2000, 3, threshold=0.979, fp_rate_per_cell=0.0007, target_rbc=2000, rbc_per_ul=None,
                        fields_used=20, fields_rejected=0)
    assert s.call == "negative" and s.expected_false_positives == pytest.approx(1.4)
    assert s.positive_cutoff_cells > 3
    assert "within" not in s.call_reason and f"fewer than the {s.positive_cutoff_cells}" in s.call_reason


def test_a_target_too_small_for_any_call_is_not_enough_cells_not_negative():
    # 1 of 1 cells flagged read "negative" at a target of 1: at the shipped card's rate a positive call
    # needs 2 flagged cells, more than were counted, so no count of them is a call
    fp = 0.00526
    assert positive_cutoff(1, fp) == 2
    s = summarize_slide(1, 1, threshold=0.966, fp_rate_per_cell=fp, target_rbc=1)
    assert s.call == "not enough cells" and "count more cells" in s.call_reason
    assert summarize_slide(2, 2, threshold=0.966, fp_rate_per_cell=fp, target_rbc=2).call == "positive"
    assert summarize_slide(2, 1, threshold=0.966, fp_rate_per_cell=fp, target_rbc=2).call == "negative"


def test_threshold_text_rounds_down_so_the_shown_value_flags_the_same_cells():
    from device.slide import threshold_text

    assert threshold_text(0.9660098993814743) == "0.966"  # nearest rounding showed 0.96601: above the level
    assert threshold_text(0.5) == "0.5" and threshold_text(0.97) == "0.97" and threshold_text(0.9700) == "0.97"


def test_a_typed_threshold_is_shown_so_that_typed_back_it_flags_the_same_cells():
    """A threshold an admin typed with 6 decimals (0.973275) was shown rounded down (0.97327); typed back
    from the page, it flagged the cells of the score level between the two, which the threshold does not."""
    from decimal import ROUND_FLOOR, Decimal

    from device.model_card import load_card
    from device.slide import threshold_text
    from tests.conftest import MODEL_PATH

    card = load_card(MODEL_PATH)
    levels = card.output_scores()
    typed = [round(float(v) + 2e-6, 6) for v in levels if 0.5 < v < 0.9999]
    floor5 = [float(Decimal(repr(t)).quantize(Decimal("0.00001"), rounding=ROUND_FLOOR)) for t in typed]
    # rounded down to 5 decimals, some cross a level (the case this test is about)
    assert any(card.effective_threshold(f) != card.effective_threshold(t) for f, t in zip(floor5, typed, strict=True))
    for t in typed:
        assert card.effective_threshold(float(threshold_text(t))) == card.effective_threshold(t), t
    assert threshold_text(0.973275) == "0.973275" and threshold_text(0.978873) == "0.978873"


def test_a_threshold_typed_as_shown_gets_the_cards_own_false_positive_rate():
    # the page showed "threshold 0.966"; `analyze --slide --threshold 0.966` then read the curve's row below
    # (0.9591: rate 0.00636, K 26) though 0.966 flags exactly the cells the card's 0.96600990 flags
    from device.model_card import load_card
    from device.slide import threshold_text
    from tests.conftest import MODEL_PATH

    card = load_card(MODEL_PATH)
    levels = card.output_scores()
    assert levels is not None and len(levels) == 256
    for t in [card.threshold, *(row["threshold"] for row in card.data["operating_curve"])]:
        shown = float(threshold_text(t))
        assert card.effective_threshold(shown) == card.effective_threshold(t)
        assert card.false_positive_rate_at(shown) == card.false_positive_rate_at(t)
    assert card.false_positive_rate_at(0.966) == card.false_positive_rate
    below = float(levels[levels < card.threshold].max())  # the next score down flags more healthy cells
    assert card.effective_threshold(below) == below
    assert card.false_positive_rate_at(below) > card.false_positive_rate
    assert card.false_positive_rate_at(below + 1e-6) == card.false_positive_rate
