"""Figures of a classifier on labelled images: accuracy with its interval, per-class figures, calibration and
"uncertain" answers, per source photo and per lab; the text report and the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from hematovision.abstention import expected_calibration_error, negative_log_likelihood

UNCERTAIN = "UNCERTAIN"


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Score interval for a proportion (sane at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 0.0)
    interval = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(interval.low), float(interval.high))


def accuracy_by(groups, y_true, y_pred) -> dict[str, float]:
    """Accuracy within each value of `groups` (e.g. the lab of each image)."""
    groups, y_true, y_pred = np.asarray(groups), np.asarray(y_true), np.asarray(y_pred)
    return {str(g): float((y_pred[groups == g] == y_true[groups == g]).mean()) for g in np.unique(groups)}


def summarise(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    k = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=k, zero_division=0)
    correct = int((y_true == y_pred).sum())
    n = int(len(y_true))
    low, high = wilson_interval(correct, n)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [low, high],
        "macro_f1": float(f1_score(y_true, y_pred, labels=k, average="macro", zero_division=0)),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=k).tolist(),
    }

def count_reasons(reasons: list) -> dict[str, int]:
    """How many answers were "uncertain" for each reason (None = answered)."""
    return {reason: sum(1 for r in reasons if r == reason) for reason in sorted({r for r in reasons if r is not None})}

def summarise_abstention(y_true: np.ndarray, raw: np.ndarray, probs: np.ndarray, reasons: list,
                         labels: list[str]) -> dict:
    """Calibration (ECE before and after the temperature), how many images were answered "uncertain" and why,
    and the figures on the images that were answered."""
    k = list(range(len(labels)))
    abstained = np.array([r is not None for r in reasons], dtype=bool)
    answered = ~abstained
    y_pred = probs.argmax(axis=1)
    n_answered = int(answered.sum())
    correct_answered = int((y_pred[answered] == y_true[answered]).sum())
    low, high = wilson_interval(correct_answered, n_answered)
    # Rows: true class; columns: the labels, then UNCERTAIN for the images that got no label.
    with_uncertain = np.zeros((len(labels), len(labels) + 1), dtype=int)
    if n_answered:
        with_uncertain[:, :-1] = confusion_matrix(y_true[answered], y_pred[answered], labels=k)
    for i in k:
        with_uncertain[i, -1] = int((abstained & (y_true == i)).sum())
    n = len(y_true)
    return {
        "ece": expected_calibration_error(probs, y_true),
        "ece_uncalibrated": expected_calibration_error(raw, y_true),
        "log_loss": negative_log_likelihood(probs, y_true) if n else 0.0,
        "log_loss_uncalibrated": negative_log_likelihood(raw, y_true) if n else 0.0,
        "abstained": int(abstained.sum()),
        "abstention_rate": float(abstained.mean()) if n else 0.0,
        "abstained_by_reason": count_reasons(reasons),
        "answered": n_answered,
        "accuracy_answered": float(accuracy_score(y_true[answered], y_pred[answered])) if n_answered else 0.0,
        "accuracy_answered_ci95": [low, high],
        "confusion_matrix_with_uncertain": with_uncertain.tolist(),
    }

def summarise_sources(y_true: np.ndarray, probs: np.ndarray, reasons: list, sources: list[str | None]) -> dict:
    """Accuracy per source photo, and over photos: the mean of their accuracies, and the share of photos whose
    majority vote (over their answered images) is right, with a Wilson interval over photos."""
    y_pred = probs.argmax(axis=1)
    abstained = np.array([r is not None for r in reasons], dtype=bool)
    per_source = {}
    for source in sorted({s for s in sources if s is not None}, key=lambda s: (len(s), s)):
        members = np.array([s == source for s in sources])
        answered = members & ~abstained
        votes = np.bincount(y_pred[answered], minlength=probs.shape[1]) if answered.any() else None
        per_source[source] = {
            "n": int(members.sum()),
            "label": int(np.bincount(y_true[members]).argmax()),
            "accuracy": float((y_pred[members] == y_true[members]).mean()),
            "abstained": int((members & abstained).sum()),
            "majority_vote": int(votes.argmax()) if votes is not None else None,
        }
    n_sources = len(per_source)
    right = sum(1 for s in per_source.values() if s["majority_vote"] == s["label"])
    low, high = wilson_interval(right, n_sources)
    return {
        "n_sources": n_sources,
        "images_without_source": int(sum(s is None for s in sources)),
        "mean_accuracy_per_source": float(np.mean([s["accuracy"] for s in per_source.values()])) if n_sources else 0.0,
        "majority_vote_accuracy": right / n_sources if n_sources else 0.0,
        "majority_vote_accuracy_ci95": [low, high],
        "sources": per_source,
    }

def format_report(result: dict) -> str:
    labels = result["labels"]
    low, high = result["accuracy_ci95"]
    lines = [
        f"images: {result['n']}   accuracy: {result['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f})   "
        f"macro-F1: {result['macro_f1']:.4f}",
        "",
        f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for label in labels:
        c = result["per_class"][label]
        lines.append(f"{label:<12}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>9}")
    width = max(len(label) for label in labels) + 2
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * width + "".join(f"{label[:10]:>11}" for label in labels)]
    for label, row in zip(labels, result["confusion_matrix"], strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{v:>11}" for v in row))
    if "ece" in result:
        low, high = result["accuracy_answered_ci95"]
        reasons = ", ".join(f"{k}: {v}" for k, v in result["abstained_by_reason"].items()) or "none"
        temperature = f"temperature {result.get('temperature', 1.0):.3f}"
        if result.get("temperature_distance_slope"):
            temperature += f" x exp({result['temperature_distance_slope']:.4f} x (distance - its median))"
        lines += [
            "",
            f"calibration ({temperature}): ECE {result['ece_uncalibrated']:.4f} -> "
            f"{result['ece']:.4f}, log-loss {result['log_loss_uncalibrated']:.4f} -> {result['log_loss']:.4f}",
            f"answered 'uncertain': {result['abstained']} of {result['n']} "
            f"({result['abstention_rate']:.2%}; {reasons})",
            f"accuracy on the {result['answered']} answered images: {result['accuracy_answered']:.4f} "
            f"(95% CI {low:.4f}-{high:.4f})",
            "",
            "confusion matrix with the uncertain answers (rows: true, columns: answered)",
            " " * width + "".join(f"{label[:10]:>11}" for label in [*labels, UNCERTAIN]),
        ]
        for label, row in zip(labels, result["confusion_matrix_with_uncertain"], strict=True):
            lines.append(f"{label:<{width}}" + "".join(f"{v:>11}" for v in row))
    if result.get("per_source"):
        ps = result["per_source"]
        low, high = ps["majority_vote_accuracy_ci95"]
        lines += ["", f"per source photo ({ps['n_sources']} photos, {result.get('sources_csv')}): mean accuracy "
                      f"{ps['mean_accuracy_per_source']:.4f}; majority vote right for "
                      f"{ps['majority_vote_accuracy']:.4f} of photos (95% CI {low:.4f}-{high:.4f})"]
        worst = sorted(ps["sources"].items(), key=lambda item: item[1]["accuracy"])[:5]
        lines.append("  lowest: " + ", ".join(f"{sid} ({labels[s['label']]}, n={s['n']}): {s['accuracy']:.2f}"
                                             for sid, s in worst))
    if result.get("skipped_folders"):
        lines += ["", f"skipped folders (classes the model does not know): {result['skipped_folders']}"]
    return "\n".join(lines)

def plot_confusion(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    ConfusionMatrixDisplay(np.asarray(result["confusion_matrix"]), display_labels=result["labels"]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
