"""Run reports: scikit-learn classification report, PNG plots and a grid of misclassified cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data import CLASS_NAMES


def write_reports(out: Path, history: dict, y: np.ndarray, p: np.ndarray, x: np.ndarray, kept) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import classification_report, confusion_matrix, roc_curve

    pred = (p >= 0.5).astype(int)
    report = classification_report(y, pred, labels=[0, 1], target_names=list(CLASS_NAMES), digits=4,
                                   zero_division=0)
    (out / "classification_report.txt").write_text(report)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(history.get(key, []), label=f"train {key}")
        if history.get(f"val_{key}"):  # none when every training patient was fitted (no monitor patients)
            ax.plot(history[f"val_{key}"], label=f"early-stopping {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    cm = confusion_matrix(y, pred, labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("validation patients")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], "k:")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, validation patients")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)

    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-np.abs(p[wrong] - 0.5))][:64]
    cols = 8
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        ax.imshow(x[i])
        ax.set_title(f"{CLASS_NAMES[y[i]][:5]} p={p[i]:.2f}\n{kept[i].patient}", fontsize=6)
    fig.suptitle(f"misclassified validation cells ({len(np.flatnonzero(pred != y))} total, worst 64)")
    fig.tight_layout()
    fig.savefig(out / "misclassified.png", dpi=100)
    plt.close(fig)
