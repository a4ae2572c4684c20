"""Does a lab's colour cast (lamp, camera white balance, a yellowish mounting medium) change the answer? Accuracy on
each lab's validation rows as they are and with a cast multiplied into the photo before the pipeline, for models
trained with and without the white-balanced crop (hematovision.cells.white_balance).

    python training/experiments/measure_colour_cast.py --data-root ../shared/data \
        --model balanced=/tmp/abl/colour.h5 --model unbalanced:raw=/tmp/abl/base.h5 \
        --json training/experiments/results/colour_cast.json

`NAME:raw=MODEL.h5` marks a model trained on crops without the white balance: its crops are cut the same way,
without it. Validation rows only (no test rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import hematovision.cells as cells
from hematovision.imaging import field_from_image
from training import config, splits

CASTS = {"none": (1.0, 1.0, 1.0), "yellow": (1.0, 0.93, 0.72), "blue": (0.82, 0.9, 1.0), "dim": (0.75, 0.72, 0.7)}


def crops_of(paths, cast) -> tuple[np.ndarray, np.ndarray]:
    out, found = [], []
    for path in paths:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), np.float32)
        field = field_from_image(Image.fromarray(np.clip(rgb * np.array(cast), 0, 255).astype(np.uint8)))
        found.append(field.primary is not None)
        if field.primary is not None:
            out.append(field.primary_crop)
    return np.stack(out), np.array(found)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", action="append", required=True, metavar="NAME[:raw]=MODEL.h5")
    p.add_argument("--labs", default="pbc,lisc")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from hematovision.classifier import load_classifier

    balance = cells.white_balance
    result: dict = {"casts": CASTS, "split": "validation", "accuracy": {}}
    for spec in args.model:
        name, _, path = spec.partition("=")
        name, _, raw = name.partition(":")
        classifier = load_classifier(Path(path))
        cells.white_balance = (lambda image, background: image) if raw else balance
        for lab in args.labs.split(","):
            rows = splits.lab_rows(lab, args.data_root, config.LABELS, "validation")
            for cast_name, cast in CASTS.items():
                crops, found = crops_of(rows.paths, cast)
                predicted = classifier.run(crops, views=1)[0].argmax(1)
                accuracy = float((predicted == np.asarray(rows.targets)[found]).sum() / len(rows))
                result["accuracy"].setdefault(name, {}).setdefault(lab, {})[cast_name] = round(accuracy, 4)
                print(f"{name:12s} {lab:6s} {cast_name:7s} {accuracy:.4f}", flush=True)
    cells.white_balance = balance
    if args.json:
        config.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
