"""What the detector's smear check (hematovision.cells, step 6) costs and buys: on the three labs' training and
validation images, how many images lose their white cells to it (the cost) and how far each lab's values stay from
the limits; on a non-cell *validation* set, how many images it clears of "cells" (what it buys). The non-cell set
of measure_abstention.py (seed 20261126) stays the test and is not read here; neither are any lab's test rows,
unless --splits names them (to confirm that the check moves no primary cell there, after the choice).

    python training/experiments/make_noncell_set.py --bccd-dir ../shared/data/blood-cells/dataset-master \
        --out /tmp/hv_noncell_val --seed 1
    python training/experiments/measure_smear_check.py --data-root ../shared/data --noncell-dir /tmp/hv_noncell_val \
        [--json training/experiments/results/smear_check.json]

Also reads the BCCD originals (blood-cells/dataset-master/JPEGImages), the detector's tuning fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import hematovision.cells as cells
from hematovision.imaging import ImageRejected, decode_image, to_rgb
from training import config, splits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--noncell-dir", type=Path, required=True, help="a non-cell set made with another --seed")
    p.add_argument("--splits", default="train,validation",
                   help="the labs' splits to read (test: only to confirm that no answer of the model changes)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def reading(path: Path) -> dict | None:
    """The check's values for one image and how many cells are found with and without it (None: unreadable)."""
    try:
        rgb = np.asarray(to_rgb(decode_image(Path(path).read_bytes())), dtype=np.uint8)
    except ImageRejected:
        return None
    found = cells.analyse(rgb)
    cells.SMEAR_CHECK = False
    before = cells._cells(rgb, found)
    cells.SMEAR_CHECK = True
    after = cells._cells(rgb, found)
    if found is None or not before:
        return {"before": 0, "after": len(after)}
    primary_before = before[cells.primary_index(before, rgb.shape)].box
    primary_after = after[cells.primary_index(after, rgb.shape)].box if after else None
    extents = [area / ((ys.stop - ys.start) * (xs.stop - xs.start))
               for (ys, xs), area in cells.nucleus_groups(found["nucleus"], found["radius"])]
    return {"before": len(before), "after": len(after), "level": found["level"], "grain": found["grain"],
            "max_extent": max(extents), "primary_changed": primary_after != primary_before}


def summary(readings: list[dict | None]) -> dict:
    found = [r for r in readings if r and r["before"]]
    out = {"images": len(readings), "with_a_cell": len(found),
           "with_a_cell_after_check": sum(1 for r in readings if r and r["after"]),
           "cells": sum(r["before"] for r in found), "cells_after_check": sum(r["after"] for r in found),
           "primary_cell_changed": sum(r["primary_changed"] for r in found)}
    if found:
        out.update({"level_min": round(min(r["level"] for r in found), 3),
                    "grain_max": round(max(r["grain"] for r in found), 2),
                    "max_extent_max": round(max(r["max_extent"] for r in found), 3)})
    return out


def read_all(paths) -> list[dict | None]:
    with ProcessPoolExecutor() as pool:
        return list(pool.map(reading, paths, chunksize=16))


def main(argv=None) -> dict:
    args = parse_args(argv)
    splits.check_data_root(args.data_root, config.LABS)
    limits = {name: getattr(cells, name) for name in
              ("SMEAR_LEVEL_MIN", "SMEAR_NOISE_MAX", "RECTANGLE_EXTENT")}
    result = {"limits": limits, "labs": {}, "noncell": {}}
    for lab in config.LABS:
        for split in args.splits.split(","):
            rows = splits.lab_rows(lab, args.data_root, config.LABELS, split)
            result["labs"][f"{lab} {split}"] = row = summary(read_all(rows.paths))
            print(f"{lab} {split}", json.dumps(row), flush=True)
    bccd = sorted((args.data_root / "blood-cells" / "dataset-master" / "JPEGImages").glob("*.jpg"))
    result["labs"]["bccd fields"] = row = summary(read_all(bccd))
    print("bccd fields", json.dumps(row), flush=True)
    rows = splits.noncell_rows(args.noncell_dir)
    readings = read_all(rows.paths)
    kinds = np.asarray(rows.groups)
    for kind in sorted(set(rows.groups)):
        picked = [r for r, k in zip(readings, kinds, strict=True) if k == kind]
        result["noncell"][kind] = row = summary(picked)
        print(f"non-cell {kind}", json.dumps(row), flush=True)
    result["noncell_set"] = f"{args.noncell_dir.name}: {len(rows)} images"
    if args.json:
        config.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
