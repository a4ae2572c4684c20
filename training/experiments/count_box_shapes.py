"""How elongated the cell finder's boxes are, on real cells and on non-cell pictures: could "a white cell is
roughly round" reject the non-cells that pass as cells? Counts boxes longer than wide by more than each ratio.

    python training/experiments/count_box_shapes.py --data-root ../shared/data --noncell-dir /tmp/hv_noncell_val \
        [--json training/experiments/results/recipe_colour/box_shapes.json]

Kaggle TRAIN and TEST and PBC are sampled (every 4th, 4th and 2nd file, by sorted name); BCCD's fields, LISC and
the non-cell set are read whole. "primary" counts only the cell the app answers for (nearest the centre).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from hematovision.imaging import ImageRejected, prepare_field
from training import config, splits

RATIOS = (2.5, 3.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--noncell-dir", type=Path, required=True)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def shapes(path: Path) -> list[tuple[float, bool]]:
    """(longer side / shorter side, is it the primary cell) for each cell found in the file."""
    try:
        field = prepare_field(path.read_bytes())
    except ImageRejected:
        return []
    out = []
    for i, cell in enumerate(field.cells):
        x0, y0, x1, y1 = cell.box
        out.append((max(x1 - x0, y1 - y0) / max(1, min(x1 - x0, y1 - y0)), i == field.primary))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data_root
    sets = {
        "bccd_fields": sorted((root / "blood-cells/dataset-master/JPEGImages").glob("*.jpg")),
        "kaggle_train": sorted((root / "blood-cells/dataset2-master/images/TRAIN").glob("*/*.jpeg"))[::4],
        "kaggle_test": sorted((root / "blood-cells/dataset2-master/images/TEST").glob("*/*.jpeg"))[::4],
        "pbc": sorted((root / "pbc-4class").glob("*/*.jpg"))[::2],
        "lisc": sorted((root / "lisc-crops").glob("*/*.jpg")),
        "noncells": splits.noncell_rows(args.noncell_dir).paths,
    }
    result = {}
    with ProcessPoolExecutor() as pool:
        for name, files in sets.items():
            found = [s for one in pool.map(shapes, files, chunksize=16) for s in one]
            ratio = np.array([r for r, _ in found])
            primary = np.array([r for r, is_primary in found if is_primary])
            result[name] = {"files": len(files), "cells": len(found),
                            "max_ratio": round(float(ratio.max()), 2) if len(ratio) else None,
                            **{f"over_{r}": int((ratio > r).sum()) for r in RATIOS},
                            **{f"primary_over_{r}": int((primary > r).sum()) for r in RATIOS}}
            print(name, result[name], flush=True)
    if args.json:
        config.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
