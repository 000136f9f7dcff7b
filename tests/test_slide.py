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
    assert pos.call == "positive" and "40 infected" in pos.call_reason


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


def test_detection_limit_follows_the_cutoff_and_count():
    s = summarize_slide(2000, 0, threshold=0.9, fp_rate_per_cell=0.003)
    assert s.detection_limit_pct == pytest.approx(100 * s.positive_cutoff_cells / 2000)
    assert s.detection_limit_per_ul == pytest.approx(s.positive_cutoff_cells / 2000 * 5e6)
    assert s.to_json()["ci95_pct"] == list(s.ci95_pct)


def test_detection_limit_fraction_balances_false_positives_and_sensitivity():
    from device.slide import detection_limit_fraction

    # no false positives: one cell at full sensitivity -> 1/n
    assert detection_limit_fraction(0.0, 1.0, 2000) == pytest.approx(1 / 2000)
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
