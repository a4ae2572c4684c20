"""Evaluate trained variants side by side: validation (to choose) and test sets (to report), with and without
test-time views. Writes the ablation table of the model card.

    python training/compare_variants.py --kaggle ../shared/data/blood-cells/dataset2-master/images \
        --pbc-dir ../shared/data/pbc-4class --variants /tmp/ablation/*/blood_cell_model.h5 model/blood_cell_model.h5 \
        --json model/ablation.json --markdown model/ablation.md

Validation = Kaggle TRAIN's held-out source photos (train.py's grouped split, seed 1337) and PBC's validation rows;
tests = Kaggle TEST and PBC's test rows. The choice between variants is made on the validation columns only
(mean of the Kaggle and PBC validation accuracy, one view); the test columns are what the choice then scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hematovision.datasets import list_images, load_arrays
from training.train import DEFAULTS as TRAIN_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
SETS = ("kaggle_val", "pbc_val", "kaggle_test", "pbc_test")
VIEWS = (1, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kaggle", required=True, type=Path, help="dataset2-master/images (holds TRAIN and TEST)")
    p.add_argument("--pbc-dir", required=True, type=Path)
    p.add_argument("--pbc-split", type=Path, default=TRAIN_DEFAULTS["pbc_split"])
    p.add_argument("--variants", nargs="+", type=Path, required=True, help=".h5 files (metadata JSON beside each)")
    p.add_argument("--views", nargs="+", type=int, default=list(VIEWS), help="test-time views to score (1, 2, 4, 8)")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="score only these sets")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def load_sets(args) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Arrays of the wanted sets: the splits as train.py, fit_abstention.py and evaluate.py read them."""
    from training.evaluate import split_rows
    from training.fit_abstention import kaggle_split

    _, kaggle_val = kaggle_split(args.kaggle / "TRAIN", None, TRAIN_DEFAULTS["sources"],
                                 TRAIN_DEFAULTS["val_fraction"], TRAIN_DEFAULTS["seed"])
    labels = kaggle_val.labels
    sets = {
        "kaggle_val": lambda: kaggle_val,
        "pbc_val": lambda: split_rows(args.pbc_dir, args.pbc_split, "validation", labels),
        "kaggle_test": lambda: list_images(args.kaggle / "TEST", labels),
        "pbc_test": lambda: split_rows(args.pbc_dir, args.pbc_split, "test", labels),
    }
    arrays = {}
    for name in args.sets:
        image_set = sets[name]()
        arrays[name] = (load_arrays(image_set.paths), np.asarray(image_set.targets))
        print(f"{name}: {len(image_set.targets)} images", flush=True)
    return labels, arrays


def predict_views(classifier, x: np.ndarray, views: int, batch: int = 64) -> np.ndarray:
    """The network's own probabilities (no calibration), averaged over `views` test-time views."""
    return np.concatenate([classifier.run(x[start:start + batch], views=views)[0] for start in range(0, len(x), batch)])


def score(probs: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    predicted = probs.argmax(1)
    return {"accuracy": float((predicted == y).mean()), "macro_f1": float(f1_score(y, predicted, average="macro"))}


def describe(path: Path) -> dict:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    training = meta.get("training", {})
    return {"augmentation": training.get("augmentation", "geometric"), "pbc": bool(training.get("pbc")),
            "epochs": training.get("epochs_run"), "seconds": training.get("seconds"),
            "device": training.get("device"), "command": training.get("command")}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hematovision.classifier import load_classifier

    labels, arrays = load_sets(args)
    results = {}
    for path in args.variants:
        name = path.parent.name if path.parent != ROOT / "model" else f"shipped:{path.stem}"
        classifier = load_classifier(path, runtime="tf.function")  # the Keras graph itself: no .tflite written
        row = {"model": str(path), **describe(path), "scores": {}}
        for views in args.views:
            for set_name in args.sets:
                x, y = arrays[set_name]
                row["scores"][f"{set_name}@{views}"] = score(predict_views(classifier, x, views), y)
        results[name] = row
        s = row["scores"]
        print(name, " ".join(f"{k}={v['accuracy']:.4f}" for k, v in s.items()), flush=True)
    first = min(args.views)
    choice = max(results, key=lambda n: np.mean([results[n]["scores"][f"{s}@{first}"]["accuracy"]
                                                 for s in ("kaggle_val", "pbc_val") if s in args.sets] or [0.0]))
    report = {"labels": labels, "sets": {k: int(len(arrays[k][1])) for k in args.sets}, "variants": results,
              "views": args.views, "chosen_on_validation": choice}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown_table(report))
    print(f"chosen on validation: {choice}")
    return report


def markdown_table(report: dict) -> str:
    lines = ["| variant | PBC train | augmentation | views | Kaggle val | PBC val | Kaggle TEST | PBC test |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in report["variants"].items():
        for views in report["views"]:
            s = row["scores"]
            cells = [f"{s[f'{k}@{views}']['accuracy']:.3f}" if f"{k}@{views}" in s else "" for k in SETS]
            lines.append(f"| {name} | {'yes' if row['pbc'] else 'no'} | {row['augmentation']} | {views} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
