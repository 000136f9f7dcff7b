"""Classifier metrics in plain numpy (used by train, convert and ``python -m device cells``)."""

from __future__ import annotations

import numpy as np


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count half). NaN with one class only."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, AUC and the confusion matrix.

    ``confusion`` is ``[[tn, fp], [fn, tp]]`` (rows: true uninfected, true parasitized).
    """
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(p) >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    n = len(y)

    def div(a: float, b: float) -> float:
        return float(a / b) if b else float("nan")

    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    return {
        "n": n,
        "n_parasitized": int(y.sum()),
        "n_uninfected": int((~y).sum()),
        "threshold": float(threshold),
        "accuracy": div(tp + tn, n),
        "sensitivity": sens,
        "specificity": div(tn, tn + fp),
        "precision": prec,
        "f1": div(2 * prec * sens, prec + sens) if tp else 0.0,
        "false_positive_rate": div(fp, fp + tn),
        "auc": roc_auc(y, p),
        "confusion": [[tn, fp], [fn, tp]],
    }
