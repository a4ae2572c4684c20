"""Whole BCCD fields with two white cells: does each cell get its own type? Writes
training/experiments/results/neighbours.json.

Run from the repository root (under a minute on 2 CPU cores):

    .venv/bin/python training/experiments/measure_neighbours.py --model model/blood_cell_model.h5

BCCD's labels.csv names the types of each original field's white cells, but not which box is which, so a field's
cells are scored as a multiset: the number of its cells whose predicted type matches one of the field's named types,
each named type used once (a BASOPHIL, a type the model does not know, is left out of both counts). Only fields with
two or more annotated white-cell boxes (training/splits/bccd_wbc_boxes.csv) whose photo the model never trained on
are used: not one of its Kaggle training source photos (its own split settings) and not a Kaggle TEST photo.

Each field is read twice through the app's path (hematovision.imaging.prepare_field + the Classifier): with the
image's other white cells hidden in each cell's crop (hematovision.cells.MASK_NEIGHBOURS on) and without (off, the
shipped setting). The model retrained with them hidden was measured with --model pointing at it
(results/neighbours_retrained.json).
Forced choice: the most probable of the four types, whether or not the app would call it uncertain.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import hematovision.cells as cells_module
from hematovision.classifier import load_classifier
from hematovision.imaging import prepare_field
from training import splits

ROOT = Path(__file__).resolve().parents[2]
BOXES = ROOT / "training" / "splits" / "bccd_wbc_boxes.csv"
OUT = ROOT / "training" / "experiments" / "results" / "neighbours.json"


def fields(data_root: Path, labels: list[str], settings: dict) -> list[tuple[str, Counter]]:
    """(original id, Counter of its named types) of each scored field, in id order."""
    master = data_root / "blood-cells"
    with BOXES.open() as f:
        boxes = Counter(row["original_id"] for row in csv.DictReader(f))
    with (master / "dataset-master" / "labels.csv").open() as f:
        named = {row["Image"]: row["Category"] for row in csv.DictReader(f)}
    with (master / "test_simple_to_original.csv").open() as f:
        test = {row["original_image_id"] for row in csv.DictReader(f)}
    train = splits.kaggle(data_root, labels, "train", settings["val_fraction"], settings["seed"])
    trained = {group.removeprefix("src") for group in train.groups}
    chosen = []
    for image_id in sorted((i for i, n in boxes.items() if n >= 2), key=int):
        if image_id in trained or image_id in test:
            continue
        types = Counter(t.strip() for t in named.get(image_id, "").split(",") if t.strip())
        chosen.append((image_id, types))
    return chosen


def score(classifier, data_root: Path, chosen, mask: bool) -> dict:
    before, cells_module.MASK_NEIGHBOURS = cells_module.MASK_NEIGHBOURS, mask
    try:
        right = known = 0
        rows = []
        for image_id, types in chosen:
            path = data_root / "blood-cells" / "dataset-master" / "JPEGImages" / f"BloodImage_{int(image_id):05d}.jpg"
            field = prepare_field(path.read_bytes())
            probabilities, _ = classifier.run(field.crops) if len(field.crops) else ([], None)
            predicted = [classifier.labels[int(p.argmax())] for p in probabilities]
            expected = Counter({t: n for t, n in types.items() if t in classifier.labels})
            hits = sum((Counter(predicted) & expected).values())
            right += hits
            known += sum(expected.values())
            rows.append({"id": int(image_id), "named": dict(types), "boxes": [list(c.box) for c in field.cells],
                         "predicted": predicted, "right": hits, "of": sum(expected.values())})
        return {"cells_right": right, "cells_named": known,
                "fields_all_right": sum(r["right"] == r["of"] for r in rows), "fields": rows}
    finally:
        cells_module.MASK_NEIGHBOURS = before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "model" / "blood_cell_model.h5")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    classifier = load_classifier(args.model)
    settings = classifier.metadata["training"]["settings"]
    chosen = fields(args.data_root, list(classifier.labels), settings)
    result = {"model": args.model.name, "fields": len(chosen),
              "masked": score(classifier, args.data_root, chosen, True),
              "not_masked": score(classifier, args.data_root, chosen, False)}
    for name in ("masked", "not_masked"):
        r = result[name]
        print(f"{name}: {r['cells_right']} of {r['cells_named']} cells right, "
              f"{r['fields_all_right']} of {len(chosen)} fields all right", file=sys.stderr)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
