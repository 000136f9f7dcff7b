"""Slide totals from many fields: parasitemia with a 95% Wilson interval, parasites/uL, the call."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from decimal import ROUND_FLOOR, Decimal

DEFAULT_RBC_PER_UL = 5.0e6  # a typical adult count, used when no measured RBC count is given
FALSE_ALARM_PROBABILITY = 0.001  # chance that a truly negative slide is called positive
TYPED_DECIMALS = 8  # a threshold with no more decimals than this was typed (shown whole), not computed


def threshold_text(threshold: float) -> str:
    """A threshold as every page, report and message shows it: rounded down to 5 decimals, trailing zeros
    dropped (0.9660098993814743 is "0.966").

    Down, not to the nearest: a cell is flagged when its score is at least the threshold, and the scores are
    the few levels of an 8-bit output, so a value typed back as shown flags the same cells (nearest rounding
    showed 0.96601, above the level 0.96600990 that the card's threshold is, which flags fewer cells). The
    levels near 0.999 lie 1e-4 apart, ten times the rounding. A threshold of at most 8 decimals is one a
    person typed, not a computed score, and is shown whole.
    """
    d = Decimal(repr(float(threshold)))
    if d.as_tuple().exponent >= -TYPED_DECIMALS:
        # a threshold a person typed (0.973275) is shown as typed: rounded down, it could cross a score
        # level (0.97327 flags the cells scored 0.973271, which 0.973275 does not)
        return f"{d.normalize():f}"
    return f"{d.quantize(Decimal('0.00001'), rounding=ROUND_FLOOR).normalize():f}"


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n (as fractions). (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact 0 (float rounding leaves ~1e-19)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def positive_cutoff(n: int, fp_rate: float, alpha: float = FALSE_ALARM_PROBABILITY) -> int:
    """Smallest infected count K such that a slide with no parasites reaches K with probability < alpha.

    False positives among n healthy cells are ~ Binomial(n, fp_rate), approximated by Poisson(n * fp_rate).
    With no false positives expected (fp_rate 0), one flagged cell suffices.
    """
    lam = n * max(fp_rate, 0.0)
    if lam <= 0:
        return 1
    # P(X >= k) = 1 - sum_{i<k} e^-lam lam^i / i!, each term in log space: e^-lam underflows to 0 for
    # lam > ~745 (a long slide, a high FP rate), and a running product of it would never grow.
    log_lam = math.log(lam)
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.exp(k * log_lam - lam - math.lgamma(k + 1))
        if 1.0 - cdf < alpha:
            return k + 1
    return n + 1  # more than every cell: this many false positives are expected that no count is a call


def detection_limit_fraction(fp_rate: float, sensitivity: float, n: int) -> float:
    """Parasitemia (fraction) at which a slide of n cells is expected to reach the positive cutoff.

    Infected count ~ n * (q * sensitivity + fp_rate); the call needs positive_cutoff(n, fp_rate) cells.
    """
    if sensitivity <= 0:
        return float("inf")
    k = positive_cutoff(n, fp_rate)
    return max(k - n * fp_rate, 1.0) / (n * sensitivity)


@dataclass(frozen=True)
class SlideSummary:
    rbc_count: int
    infected_count: int
    parasitemia_pct: float
    ci95_pct: tuple[float, float]
    parasites_per_ul: float
    ci95_per_ul: tuple[float, float]
    rbc_per_ul: float
    rbc_per_ul_source: str  # "assumed" or "measured"
    target_rbc: int
    progress: float  # 0..1 toward the counting target
    # K/n: the flagged share at which the call turns positive at this count (at least the target). As a
    # parasitemia limit it takes every parasite as flagged and no false positive: README says why.
    detection_limit_pct: float
    detection_limit_per_ul: float
    positive_cutoff_cells: int
    expected_false_positives: float
    call: str  # "positive" | "negative" | "not enough cells"
    call_reason: str
    threshold: float
    fp_rate_per_cell: float
    fields_used: int
    fields_rejected: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["ci95_pct"] = list(self.ci95_pct)
        d["ci95_per_ul"] = list(self.ci95_per_ul)
        return d


def summarize_slide(
    rbc_count: int,
    infected_count: int,
    *,
    threshold: float,
    fp_rate_per_cell: float,
    target_rbc: int = 2000,
    rbc_per_ul: float | None = None,
    fields_used: int = 0,
    fields_rejected: int = 0,
    confirmed_count: int = 0,
) -> SlideSummary:
    """Totals and the slide call.

    The call is positive only when the infected count is beyond what the classifier's false-positive
    rate per healthy cell would produce on a parasite-free slide of this many cells, at least the counting
    target (probability < 0.1%). A slide looked at after every field is not called positive early by
    chance: below the target the cutoff is the target's, and the count only grows. The 0.1% holds for a
    slide finished once it reaches its target; each look past it is another chance (a parasite-free slide
    of 150-cell fields looked at after each one read positive at some look with probability 0.07% by
    2,100 cells, 0.24% by 4,050 and 0.86% by 30,000), so the page asks to finish at the target.
    Below the counting target the call is "not enough cells" unless the count is
    already decisively positive. ``confirmed_count`` of the infected cells were confirmed as parasites
    by a person: one is enough for a positive call, and the false-positive allowance applies to the
    others only.

    Raises:
        ValueError: a target below 1, an RBC count per uL that is not a positive finite number, an
            infected count outside 0..rbc_count, or a confirmed count outside 0..infected_count.
    """
    if int(target_rbc) < 1:
        raise ValueError(f"the counting target must be at least 1 red cell, not {target_rbc}")
    if rbc_per_ul is not None and not (math.isfinite(rbc_per_ul) and rbc_per_ul > 0):
        raise ValueError(f"the RBC count per uL must be a positive number, not {rbc_per_ul}")
    n, k = int(rbc_count), int(infected_count)
    if not 0 <= k <= n:
        raise ValueError(f"infected cells ({k}) must lie in 0..{n}, the red cells counted")
    if not 0 <= int(confirmed_count) <= k:
        raise ValueError(f"confirmed cells ({confirmed_count}) must lie in 0..{k}, the infected count")
    per_ul = float(rbc_per_ul) if rbc_per_ul is not None else DEFAULT_RBC_PER_UL
    source = "measured" if rbc_per_ul is not None else "assumed"
    frac = k / n if n else 0.0
    lo, hi = wilson_interval(k, n)
    limit_n = max(n, int(target_rbc))
    cutoff = positive_cutoff(limit_n, fp_rate_per_cell)
    limit = cutoff / limit_n
    expected_fp = n * fp_rate_per_cell
    confirmed = int(confirmed_count)
    unconfirmed = k - confirmed
    if n > 0 and confirmed > 0:
        call = "positive"
        reason = (f"{confirmed} flagged cell{'s' if confirmed != 1 else ''} confirmed as "
                  f"{'parasites' if confirmed != 1 else 'a parasite'} by review "
                  f"({n} red cells counted)")  # not "k infected": k holds flagged cells not yet reviewed
    elif n > 0 and unconfirmed > 0 and unconfirmed >= cutoff:
        call = "positive"
        reason = (f"{k} cells flagged infected in {n}: more than the false positives a parasite-free slide gives at "
                  f"threshold {threshold_text(threshold)} ({expected_fp:.1f} expected; positive from {cutoff} cells)")
    elif n < target_rbc:
        call = "not enough cells"
        reason = f"{n} of {target_rbc} red cells counted: too few for a call"
    elif cutoff > n:
        # no count of these cells could be a call: a negative would say nothing (the target is set that low)
        call = "not enough cells"
        reason = (f"{n} red cells counted: too few for a call at threshold {threshold_text(threshold)} (a "
                  f"parasite-free slide gives {expected_fp:.1f} false positives on average, and a positive call "
                  f"needs {cutoff}, more cells than were counted): count more cells")
    else:
        call = "negative"
        reason = (f"{k} cells flagged infected in {n}: fewer than the {cutoff} that make a slide positive at threshold "
                  f"{threshold_text(threshold)} (a parasite-free slide gives {expected_fp:.1f} false positives on "
                  f"average, and up to {cutoff - 1} by chance)")
    return SlideSummary(
        rbc_count=n,
        infected_count=k,
        parasitemia_pct=100.0 * frac,
        ci95_pct=(100.0 * lo, 100.0 * hi),
        parasites_per_ul=frac * per_ul,
        ci95_per_ul=(lo * per_ul, hi * per_ul),
        rbc_per_ul=per_ul,
        rbc_per_ul_source=source,
        target_rbc=int(target_rbc),
        progress=min(1.0, n / target_rbc),
        detection_limit_pct=100.0 * limit,
        detection_limit_per_ul=limit * per_ul,
        positive_cutoff_cells=cutoff,
        expected_false_positives=expected_fp,
        call=call,
        call_reason=reason,
        threshold=float(threshold),
        fp_rate_per_cell=float(fp_rate_per_cell),
        fields_used=int(fields_used),
        fields_rejected=int(fields_rejected),
    )
