"""How often a model says "I can't answer" where it should, and answers where it can: through the app's path
(prepare_field, the primary cell's crop, Classifier.assess), nothing fitted or chosen here.

    python training/experiments/make_noncell_set.py --bccd-dir ../shared/data/blood-cells/dataset-master \
        --out /tmp/hv_noncell
    python training/experiments/measure_abstention.py --model model/blood_cell_model.h5 \
        --noncell-dir /tmp/hv_noncell --data-root ../shared/data [--json training/experiments/results/abstention.json]

- non-cells (make_noncell_set.py): the share with no answer, i.e. no white cell found or "uncertain", overall and
  per kind (goal >= 0.95); with --second-noncell-dir also on the draw that choices were made on (seed 1);
- LISC's basophils (test cells; a type the model does not know): the share with no answer (goal >= 0.80).
Each lab's share answered and accuracy when answered are in the model's metadata (train.py's evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training import config, splits
from training.cropsets import load_crops
from training.metrics import wilson_interval


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=config.SHIPPED_MODEL)
    p.add_argument("--noncell-dir", type=Path, required=True)
    p.add_argument("--second-noncell-dir", type=Path,
                   help="also the validation draw of the non-cells (make_noncell_set.py --seed 1), reported apart")
    p.add_argument("--data-root", type=Path, help="also measure LISC's basophils")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def no_answer(classifier, rows: splits.Rows) -> np.ndarray:
    """True where the app gives no class: no white cell found, or an "uncertain" answer."""
    crops = load_crops(rows)
    flagged = np.ones(len(rows), bool)
    if crops.found.any():
        flagged[crops.found] = classifier.assess(crops.crops).uncertain
    return flagged


def rate(flags: np.ndarray) -> dict:
    low, high = wilson_interval(int(flags.sum()), len(flags))
    return {"n": len(flags), "rate": float(flags.mean()) if len(flags) else 0.0, "ci95": [low, high]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hematovision.classifier import load_classifier

    classifier = load_classifier(args.model)
    result = {"model": args.model.name}
    for key, folder in (("noncell", args.noncell_dir), ("noncell_second_draw", args.second_noncell_dir)):
        if folder is not None:
            rows = splits.noncell_rows(folder)
            flags = no_answer(classifier, rows)
            kinds = np.asarray(rows.groups)
            result[key] = rate(flags)
            result[f"{key}_by_kind"] = {k: rate(flags[kinds == k]) for k in sorted(set(kinds))}
    if args.data_root:
        basophils = splits.lisc(args.data_root, classifier.labels, "test", include_unknown=True)
        basophils = basophils.subset([i for i, t in enumerate(basophils.targets) if t < 0])
        result["lisc_basophils_test"] = rate(no_answer(classifier, basophils))
    print(json.dumps(result, indent=2))
    if args.json:
        config.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
