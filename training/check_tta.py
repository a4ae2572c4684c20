"""Does test-time augmentation help? Measured on the grouped VALIDATION split only (never on TEST).

    python training/check_tta.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN

Rebuilds train.py's split (same sources CSV, fraction and seed, read from the model's metadata) and compares
validation accuracy and log-loss of the plain prediction with the mean over 4 views (both flips, half-turn)
or all 8 flips/quarter-turns of each image.
A white cell has no up, down, left or right, so these views are equally valid inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--model", type=Path, default=ROOT / "model" / "blood_cell_model.h5")
    p.add_argument("--sources", type=Path, default=ROOT / "training" / "splits" / "kaggle_train_sources.csv")
    args = p.parse_args(argv)

    from hematovision.classifier import load_classifier, symmetric_views
    from hematovision.datasets import list_images, load_arrays
    from training.train import read_sources, split_by_group

    classifier = load_classifier(args.model)
    classifier.metadata["test_time_views"] = 1  # measure each view ourselves, whatever the model ships with
    settings = classifier.metadata["training"]["settings"]
    image_set = list_images(args.data_dir, classifier.labels)
    groups = read_sources(args.sources, [image_set.relative(q) for q in image_set.paths])
    _, val_idx = split_by_group(image_set.targets, groups, settings["val_fraction"], settings["seed"])
    y = np.asarray(image_set.targets)[val_idx]
    plain, tta4, tta = [], [], []
    for start in range(0, len(val_idx), 64):
        x = load_arrays([image_set.paths[i] for i in val_idx[start:start + 64]])
        views = [classifier.predict(v) for v in symmetric_views(x, 8)]
        plain.append(views[0])
        tta4.append(np.mean(views[:4], axis=0))  # identity, both flips, half-turn
        tta.append(np.mean(views, axis=0))
    result = {}
    runs = {"plain": plain, "tta4": tta4, "tta8": tta}
    for name, probs in ((name, np.concatenate(parts)) for name, parts in runs.items()):
        result[name] = {"accuracy": float((probs.argmax(1) == y).mean()),
                        "log_loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)).mean())}
    result["n"] = int(len(y))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
