"""Evaluate a HematoVision model on any folder-per-class directory of labelled images.

    python training/evaluate.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TEST \
        --json model/eval_kaggle_test.json --plot model/confusion_kaggle_test.png --update-metadata kaggle_test
    python training/evaluate.py --data-dir ../shared/data/pbc-4class \
        --split-csv training/splits/pbc_split.csv --split test --json model/eval_pbc_test.json

Class folders are matched to the model's labels case-insensitively; folders of other classes (e.g. BASOPHIL)
are skipped and reported. With --split-csv/--split, the images are that split's rows of the CSV (path,label,split;
paths relative to --data-dir) instead of every file. Images go through the same decode/resize path, inference
function, calibration and abstention rule as the web app. Prints and writes: n, accuracy with a 95% Wilson
interval, macro-F1, per-class precision / recall / F1, and the confusion matrix (rows = true class, columns =
predicted), all over every image (the model's forced choice); then the expected calibration error (15 equal-width
bins) before and after the model's temperature, the share of images answered "uncertain" (and why), and the
accuracy on the images that were answered. With --sources (a CSV path,source_id, paths relative to --data-dir,
e.g. training/splits/kaggle_train_sources.csv; training/splits/kaggle_test_sources.csv is used by itself when it
covers the images), accuracy per source photo as well: augmented copies of one photo are not independent evidence.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {"model": ROOT / "model" / "blood_cell_model.h5", "batch_size": 64}
KNOWN_SOURCES = [ROOT / "training" / "splits" / "kaggle_test_sources.csv"]  # used when they cover the images
UNCERTAIN = "UNCERTAIN"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder per class (or the root of --split-csv)")
    p.add_argument("--split-csv", type=Path, help="evaluate the rows of this CSV (path,label,split) ...")
    p.add_argument("--split", help="... whose split column is this (e.g. test)")
    p.add_argument("--sources", type=Path, help="CSV path,source_id: also report accuracy per source photo")
    p.add_argument("--model", type=Path, default=DEFAULTS["model"], help="the .h5 (metadata JSON beside it)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--plot", type=Path, help="write the confusion matrix to this PNG")
    p.add_argument("--update-metadata", metavar="NAME",
                   help="also store the figures in the model's metadata under evaluation.NAME")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    args = p.parse_args(argv)
    if (args.split_csv is None) != (args.split is None):
        p.error("--split-csv and --split go together")
    return args


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


def count_reasons(reasons: list) -> dict[str, int]:
    """How many answers were "uncertain" for each reason (None = answered)."""
    return {reason: sum(1 for r in reasons if r == reason) for reason in sorted({r for r in reasons if r is not None})}


def summarise_abstention(y_true: np.ndarray, raw: np.ndarray, probs: np.ndarray, reasons: list,
                         labels: list[str]) -> dict:
    """Calibration (ECE before and after the temperature), how many images were answered "uncertain" and why,
    and the figures on the images that were answered."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    from hematovision.abstention import expected_calibration_error, negative_log_likelihood

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


def read_source_ids(csv_path: str | Path) -> dict[str, str]:
    """relative path -> source photo id, from a CSV with columns path and source_id."""
    import csv

    with open(csv_path, newline="") as f:
        return {row["path"]: str(row["source_id"]) for row in csv.DictReader(f)}


def find_sources(relative_paths: list[str], explicit: Path | None) -> tuple[Path | None, dict[str, str]]:
    """The source CSV to use: the one given, else a known one (KNOWN_SOURCES) that covers every image."""
    if explicit is not None:
        return explicit, read_source_ids(explicit)
    for candidate in KNOWN_SOURCES:
        if candidate.is_file():
            ids = read_source_ids(candidate)
            if relative_paths and all(path in ids for path in relative_paths):
                return candidate, ids
    return None, {}


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
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    ConfusionMatrixDisplay(np.asarray(result["confusion_matrix"]), display_labels=result["labels"]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def assess_files(classifier, paths: list[Path], batch_size: int) -> dict:
    """The model's answer for each file, as the app gives it (Classifier.assess): `raw` (uncalibrated) and
    `probabilities` (calibrated) arrays, `reasons` (None, or why the answer is "uncertain") and `distances`."""
    from hematovision.datasets import load_arrays

    answers = [classifier.assess(load_arrays(paths[start:start + batch_size]))
               for start in range(0, len(paths), batch_size)]
    k = len(classifier.labels)
    distances = [a.distances for a in answers if a.distances is not None]
    return {
        "raw": np.concatenate([a.raw for a in answers]) if answers else np.zeros((0, k)),
        "probabilities": np.concatenate([a.probabilities for a in answers]) if answers else np.zeros((0, k)),
        "reasons": [reason for a in answers for reason in a.reasons],
        "distances": np.concatenate(distances) if distances else None,
    }


def load_image_set(args: argparse.Namespace, labels: list[str]):
    """Every image of the class folders, or the rows of one split of a split CSV."""
    from hematovision.datasets import list_images

    if args.split_csv is None:
        return list_images(args.data_dir, labels)
    return split_rows(args.data_dir, args.split_csv, args.split, labels)


def split_rows(data_dir: Path, split_csv: Path, split: str, labels: list[str]):
    """An ImageSet of one split of a split CSV (path,label,split; paths relative to `data_dir`). Rows of classes
    the model does not know are left out and counted in `skipped_folders`."""
    from hematovision.datasets import ImageSet
    from training.split_pbc import read_split

    index = {label.upper(): i for i, label in enumerate(labels)}
    image_set = ImageSet(root=Path(data_dir), labels=list(labels))
    rows = read_split(split_csv, split)
    if not rows:
        raise ValueError(f"No rows of split {split!r} in {split_csv}")
    for path, label in rows:
        if label.upper() not in index:
            image_set.skipped_folders[label] = image_set.skipped_folders.get(label, 0) + 1
            continue
        image_set.paths.append(Path(data_dir) / path)
        image_set.targets.append(index[label.upper()])
    return image_set


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hematovision.classifier import load_classifier, metadata_path_for

    classifier = load_classifier(args.model)
    image_set = load_image_set(args, classifier.labels)
    started = time.time()
    answers = assess_files(classifier, image_set.paths, args.batch_size)
    y_true = np.asarray(image_set.targets)
    result = summarise(y_true, answers["probabilities"].argmax(axis=1), classifier.labels)
    result.update({"data_dir": args.data_dir.as_posix(), "model": args.model.name,
                   "skipped_folders": image_set.skipped_folders, "seconds": round(time.time() - started, 1)})
    if args.split_csv is not None:
        result.update({"split_csv": args.split_csv.name, "split": args.split})
    result["temperature"] = classifier.temperature
    result["temperature_distance_slope"] = classifier.calibration.slope
    result.update(summarise_abstention(y_true, answers["raw"], answers["probabilities"], answers["reasons"],
                                       classifier.labels))
    relative = [image_set.relative(path) for path in image_set.paths]
    sources_csv, source_ids = find_sources(relative, args.sources)
    if sources_csv is not None:
        result["sources_csv"] = sources_csv.name
        result["per_source"] = summarise_sources(y_true, answers["probabilities"], answers["reasons"],
                                                 [source_ids.get(path) for path in relative])
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        name = args.data_dir.name + (f" ({args.split})" if args.split else "")
        plot_confusion(result, args.plot, f"{name}: accuracy {result['accuracy']:.3f} (n={result['n']})")
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
