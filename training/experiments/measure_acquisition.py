"""Does the way a lab photographs its cells change the answer? The shipped model on each lab's validation rows as
they are, and re-photographed the way other labs deliver cells: a tight square around the centre (the cell fills
more of it), made small (120 or 80 px), with a yellow colour cast, saved as JPEG quality 90. This is the step
before the network (finding the cell, the canonical crop, its white balance), measured without any new lab's data.

    python training/experiments/measure_acquisition.py --data-root ../shared/data \
        --json training/experiments/results/acquisition.json

Validation rows only; every third file (--every). A file where no white cell is found counts as wrong.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training import config, splits

YELLOW = (1.0, 0.95, 0.7)
VARIANTS = {  # name: (share of the shorter side kept around the centre, output side in px or None, colour cast)
    "as taken": (1.0, None, (1.0, 1.0, 1.0)),
    "tight 60%, 120 px": (0.6, 120, (1.0, 1.0, 1.0)),
    "tight 60%, 120 px, yellow": (0.6, 120, YELLOW),
    "tight 45%, 120 px, yellow": (0.45, 120, YELLOW),
    "tight 60%, 80 px, yellow": (0.6, 80, YELLOW),
}


def rephotograph(path: Path, share: float, side: int | None, cast) -> bytes:
    with Image.open(path) as image:
        image = image.convert("RGB")
    if share < 1:
        w, h = image.size
        s = int(min(w, h) * share)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if side:
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    pixels = np.clip(np.asarray(image, np.float32) * np.array(cast, np.float32), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", type=Path, default=config.SHIPPED_MODEL)
    p.add_argument("--labs", default="pbc,lisc")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from hematovision.classifier import load_classifier
    from hematovision.imaging import prepare_field

    classifier = load_classifier(args.model)
    result: dict = {"model": args.model.name, "split": "validation", "every": args.every, "variants": {}}
    for lab in args.labs.split(","):
        rows = splits.lab_rows(lab, args.data_root, config.LABELS, "validation")
        paths, targets = rows.paths[::args.every], np.asarray(rows.targets)[::args.every]
        for name, (share, side, cast) in VARIANTS.items():
            fields = [prepare_field(rephotograph(path, share, side, cast)) for path in paths]
            found = np.array([f.primary is not None for f in fields])
            assessment = classifier.assess(np.stack([f.primary_crop for f in fields if f.primary is not None]))
            right = assessment.probabilities.argmax(1) == targets[found]
            figures = {"n": len(paths), "cell_found": round(float(found.mean()), 4),
                       "accuracy": round(float(right.sum() / len(paths)), 4),
                       "answered": round(float((~assessment.uncertain).sum() / len(paths)), 4)}
            result["variants"].setdefault(lab, {})[name] = figures
            print(f"{lab:5s} {name:28s} found {figures['cell_found']:.3f} accuracy {figures['accuracy']:.3f} "
                  f"answered {figures['answered']:.3f}", flush=True)
    if args.json:
        config.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
