"""How many test-time views (flips/turns averaged, hematovision.classifier.symmetric_views) to serve: accuracy of
a model on each lab's validation rows with 1, 2, 4 and 8 views. Validation only: the choice is made here.

    python training/experiments/measure_views.py --data-root ../shared/data --model model/blood_cell_model.h5 \
        --json training/experiments/results/views.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training import config, splits
from training.cropsets import load_crops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", type=Path, default=config.SHIPPED_MODEL)
    p.add_argument("--labs", default="kaggle,pbc,lisc")
    p.add_argument("--split", default="validation", choices=["validation", "train"])
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from hematovision.classifier import load_classifier

    classifier = load_classifier(args.model)
    result: dict = {"model": args.model.name, "split": args.split, "by_views": {}}
    for lab in args.labs.split(","):
        rows = splits.lab_rows(lab, args.data_root, config.LABELS, args.split)
        crops = load_crops(rows, cache_dir=args.cache_dir, desc=f"{lab} {args.split}")
        for views in (1, 2, 4, 8):
            raw, _ = classifier.run(crops.crops, views=views)
            correct = raw.argmax(1) == crops.targets
            # files with no white cell found count as wrong, as in every evaluation
            acc = float(correct.sum() / len(rows))
            result["by_views"].setdefault(str(views), {})[lab] = round(acc, 4)
            print(f"{lab:7s} views {views}: {acc:.4f}  (n={len(rows)})", flush=True)
    for by_lab in result["by_views"].values():
        by_lab["mean"] = round(float(np.mean(list(by_lab.values()))), 4)
    print(json.dumps(result["by_views"], indent=1))
    if args.json:
        config.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
