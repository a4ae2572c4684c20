"""Write the fixed, stratified train / validation / test split of the PBC set (a second lab) to a CSV.

    python training/experiments/split_pbc.py --data-dir ../shared/data/pbc-4class

Each PBC image is one cell photographed once (the set's duplicates were removed upstream), so a stratified split
by file is honest here, unlike Kaggle TRAIN's augmented copies. Per class, the files are sorted by name, shuffled
with the seed and cut 60/20/20. The CSV (training/splits/pbc_split.csv) is committed: training reads the train
and validation rows, evaluate.py --split test reads the test rows, and nobody tunes on the test rows.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from hematovision.datasets import list_images

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {"out": ROOT / "training" / "splits" / "pbc_split.csv", "seed": 1337, "fractions": (0.6, 0.2, 0.2)}
SPLITS = ("train", "validation", "test")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="PBC folder per class")
    p.add_argument("--out", type=Path, default=DEFAULTS["out"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    return p.parse_args(argv)


def assign_splits(paths_by_class: dict[str, list[str]], seed: int,
                  fractions=DEFAULTS["fractions"]) -> list[tuple[str, str, str]]:
    """(path, label, split) rows; the same input and seed give the same rows on any machine."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in sorted(paths_by_class):
        files = sorted(paths_by_class[label])
        order = rng.permutation(len(files))
        n_train = int(round(fractions[0] * len(files)))
        n_val = int(round(fractions[1] * len(files)))
        for rank, i in enumerate(order):
            split = SPLITS[0] if rank < n_train else SPLITS[1] if rank < n_train + n_val else SPLITS[2]
            rows.append((files[i], label, split))
    return sorted(rows)


def read_split(csv_path: str | Path, split: str) -> list[tuple[str, str]]:
    """(relative path, label) of one split of a split CSV."""
    with open(csv_path, newline="") as f:
        return [(row["path"], row["label"]) for row in csv.DictReader(f) if row["split"] == split]


def main(argv=None) -> list[tuple[str, str, str]]:
    args = parse_args(argv)
    image_set = list_images(args.data_dir)
    by_class: dict[str, list[str]] = {label: [] for label in image_set.labels}
    for path, target in zip(image_set.paths, image_set.targets, strict=True):
        by_class[image_set.labels[target]].append(image_set.relative(path))
    rows = assign_splits(by_class, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    for split in SPLITS:
        counts = {label: sum(1 for _, lab, s in rows if s == split and lab == label) for label in by_class}
        print(f"{split}: {sum(counts.values())} {counts}")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
