"""The leave-one-lab-out table of the model card, from the metadata of the models train.py wrote.

    for lab in kaggle pbc lisc; do
      python training/train.py --data-root ../shared/data --weights W.h5 --hold-out $lab --out /tmp/lolo_$lab/m.h5
    done
    python training/experiments/lolo_table.py --shipped model/blood_cell_model.h5 \
        --held-out /tmp/lolo_kaggle/m.h5 /tmp/lolo_pbc/m.h5 /tmp/lolo_lisc/m.h5 --json model/leave_one_lab_out.json

Each held-out model was trained and validated on the other two labs only; its row is its held-out lab's test
rows. The shipped (all-labs) model's row is each lab's test rows. Every figure is the forced-choice accuracy, the
share answered (not "uncertain" and a white cell found) and the accuracy on the answered images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shipped", type=Path, required=True)
    p.add_argument("--held-out", type=Path, nargs="+", required=True)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def figures(evaluation: dict) -> dict:
    return {"n": evaluation["n"], "accuracy": round(evaluation["accuracy"], 4),
            "accuracy_ci95": [round(v, 4) for v in evaluation["accuracy_ci95"]],
            "answered": round(1 - evaluation["abstention_rate"], 4),
            "accuracy_answered": round(evaluation["accuracy_answered"], 4),
            "no_white_cell_found": evaluation.get("no_white_cell_found", 0)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    table = {"held_out": {}, "shipped": {}}
    for path in args.held_out:
        metadata = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        lab = metadata["training"]["held_out_lab"]
        table["held_out"][lab] = {"trained_on": metadata["training"]["labs"],
                                  "wall_seconds": metadata["training"]["wall_seconds"],
                                  **figures(metadata["evaluation"][f"{lab}_test_held_out_lab"])}
    shipped = json.loads(args.shipped.with_suffix(".json").read_text(encoding="utf-8"))
    for name, evaluation in shipped["evaluation"].items():
        table["shipped"][name.removesuffix("_test")] = figures(evaluation)
    print("| lab | never seen: accuracy | answered | right when answered | all labs: accuracy | answered | right |")
    print("|---|---|---|---|---|---|---|")
    for lab in sorted(set(table["held_out"]) | set(table["shipped"])):
        row = [lab]
        for part in ("held_out", "shipped"):
            f = table[part].get(lab)
            row += ([f"{f['accuracy']:.3f}", f"{f['answered']:.1%}", f"{f['accuracy_answered']:.3f}"] if f
                    else ["", "", ""])
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
