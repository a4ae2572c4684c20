"""Where the "not like any training cell" threshold could sit, on validation data only: for each candidate
distance, the share of each lab's validation cells left without an answer and the share of a non-cell
*validation* set left without one (no white cell found, "uncertain" by the other two tests, or a found "cell"
over the distance). For choosing a threshold rule; the non-cell set of measure_abstention.py (seed 20261126)
stays the test and is not read here.

    python training/experiments/make_noncell_set.py --bccd-dir ../shared/data/blood-cells/dataset-master \
        --out /tmp/hv_noncell_val --seed 1
    python training/experiments/measure_distance_threshold.py --model M.h5 --data-root ../shared/data \
        --noncell-dir /tmp/hv_noncell_val [--json training/experiments/results/...json]

The candidates are the model's own threshold and the distances at which each validation share is reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from training import config, splits
from training.cropsets import load_crops

FLAGGED_SHARES = (0.005, 0.01, 0.02, 0.03, 0.05)  # pooled validation cells over the candidate distances


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--noncell-dir", type=Path, required=True, help="a non-cell set made with another --seed")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def distances(classifier, rows: splits.Rows) -> np.ndarray:
    """Each row's distance; infinity where it gets no answer whatever the distance threshold: no white cell
    found, or "uncertain" by one of the other two tests (low confidence, a white cell of another type)."""
    crops = load_crops(rows)
    out = np.full(len(rows), np.inf)
    if crops.found.any():
        without_distance = dataclasses.replace(classifier, rule=dataclasses.replace(classifier.rule, max_distance=None))
        assessment = without_distance.assess(crops.crops)
        out[crops.found] = np.where(assessment.uncertain, np.inf, assessment.distances)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hematovision.classifier import load_classifier

    classifier = load_classifier(args.model)
    metadata = json.loads(args.model.with_suffix(".json").read_text(encoding="utf-8"))
    settings = metadata["training"]["settings"]
    known = {lab: distances(classifier, splits.recipe_rows(lab, args.data_root, "validation", settings))
             for lab in settings["labs"]}
    rows = splits.noncell_rows(args.noncell_dir)
    noncell = distances(classifier, rows)
    kinds = np.asarray(rows.groups)
    pooled = np.concatenate([d[np.isfinite(d)] for d in known.values()])
    candidates = {"the model's own": float(metadata["abstention"]["max_distance"])}
    candidates.update({f"{share:.1%} of pooled validation cells over it": float(np.quantile(pooled, 1 - share))
                       for share in FLAGGED_SHARES})
    result = {"model": args.model.name, "model_sha256": metadata["abstention"]["model_sha256"],
              "noncell_set": f"{args.noncell_dir.name}: {len(rows)} images", "candidates": []}
    for name, threshold in candidates.items():
        row = {"name": name, "max_distance": round(threshold, 1),
               "validation_unanswered": {lab: round(float((d > threshold).mean()), 4) for lab, d in known.items()},
               "noncell_unanswered": round(float((noncell > threshold).mean()), 4),
               "noncell_unanswered_by_kind": {str(k): round(float((noncell[kinds == k] > threshold).mean()), 4)
                                              for k in sorted(set(kinds))}}
        print(json.dumps(row), flush=True)
        result["candidates"].append(row)
    if args.json:
        config.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
