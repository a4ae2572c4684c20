"""Evaluate a HematoVision model on any folder-per-class directory of labelled images.

    python training/evaluate.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TEST \
        --json model/eval_kaggle_test.json --plot model/confusion_kaggle_test.png --update-metadata kaggle_test

Class folders are matched to the model's labels case-insensitively; folders of other classes (e.g. BASOPHIL)
are skipped and reported. Images go through the same decode/resize path and the same inference function as
the web app. Prints and writes: n, accuracy with a 95% Wilson interval, macro-F1, per-class precision /
recall / F1, and the confusion matrix (rows = true class, columns = predicted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULTS = {"model": ROOT / "model" / "blood_cell_model.h5", "batch_size": 64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder per class")
    p.add_argument("--model", type=Path, default=DEFAULTS["model"], help="the .h5 (metadata JSON beside it)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--plot", type=Path, help="write the confusion matrix to this PNG")
    p.add_argument("--update-metadata", metavar="NAME",
                   help="also store the figures in the model's metadata under evaluation.NAME")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    return p.parse_args(argv)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% score interval for a proportion; sane at 0 and 1, unlike the normal approximation."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

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
    if result.get("skipped_folders"):
        lines += ["", f"skipped folders (classes the model does not know): {result['skipped_folders']}"]
    return "\n".join(lines)


def plot_confusion(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    ConfusionMatrixDisplay(np.asarray(result["confusion_matrix"]), display_labels=result["labels"]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predict_files(classifier, paths: list[Path], batch_size: int) -> np.ndarray:
    from hematovision.datasets import load_arrays

    probs = []
    for start in range(0, len(paths), batch_size):
        probs.append(classifier.predict(load_arrays(paths[start:start + batch_size])))
    return np.concatenate(probs) if probs else np.zeros((0, len(classifier.labels)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hematovision.classifier import load_classifier, metadata_path_for
    from hematovision.datasets import list_images

    classifier = load_classifier(args.model)
    image_set = list_images(args.data_dir, classifier.labels)
    started = time.time()
    probs = predict_files(classifier, image_set.paths, args.batch_size)
    result = summarise(np.asarray(image_set.targets), probs.argmax(axis=1), classifier.labels)
    result.update({"data_dir": args.data_dir.as_posix(), "model": args.model.name,
                   "skipped_folders": image_set.skipped_folders, "seconds": round(time.time() - started, 1)})
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot_confusion(result, args.plot, f"{args.data_dir.name}: accuracy {result['accuracy']:.3f} (n={result['n']})")
    if args.update_metadata:
        meta_path = metadata_path_for(args.model)
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        metadata.setdefault("evaluation", {})[args.update_metadata] = {
            k: v for k, v in result.items() if k not in ("model", "seconds")}
        meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
