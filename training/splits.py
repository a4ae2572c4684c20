"""Who is trained on, who chooses, who is only measured: the splits of the three labs.

- Kaggle TRAIN: augmented copies of ~280 source photos, so validation holds out whole source photos
  (training/splits/kaggle_train_sources.csv, made by training/experiments/group_sources.py). Kaggle TEST is the
  held-out test set (69 source photos); TEST_SIMPLE is never read by training.
- PBC: the committed stratified split training/splits/pbc_split.csv (train / validation / test rows).
- LISC: several shifted crops per cell, so the split is by cell_id (groups.csv in the LISC folder), stratified,
  with a fixed seed. BASOPHIL is a type the four-class model does not know: kept apart as "unknown type".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hematovision.datasets import IMAGE_SUFFIXES
from training import config


@dataclass
class Rows:
    """Files of one split of one lab, with their class index and group (source photo or cell)."""

    lab: str
    paths: list[Path] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, path: Path, target: int, group: str) -> None:
        self.paths.append(path)
        self.targets.append(target)
        self.groups.append(group)

    def subset(self, keep) -> Rows:
        return Rows(self.lab, [self.paths[i] for i in keep], [self.targets[i] for i in keep],
                    [self.groups[i] for i in keep])

    def per_group(self, cap: int, seed: int) -> Rows:
        """At most `cap` files of each group (Kaggle's augmented copies of one photo add little after a few)."""
        if not cap:
            return self
        rng = np.random.default_rng(seed)
        groups = np.asarray(self.groups)
        keep = [int(i) for g in np.unique(groups) for i in rng.permutation(np.flatnonzero(groups == g))[:cap]]
        return self.subset(sorted(keep))

    def per_group_by_class(self, per_class: int, seed: int) -> Rows:
        """About `per_class` files of each class, as many copies of each of its groups (a class of few photos takes
        more of each photo's augmented copies, so that every class weighs the same in training)."""
        targets, groups = np.asarray(self.targets), np.asarray(self.groups)
        rng = np.random.default_rng(seed)
        keep = []
        for k in np.unique(targets):
            class_groups = np.unique(groups[targets == k])
            cap = int(np.ceil(per_class / len(class_groups)))
            keep += [int(i) for g in class_groups for i in rng.permutation(np.flatnonzero(groups == g))[:cap]]
        return self.subset(sorted(keep))

    def limit(self, per_class: int, seed: int) -> Rows:
        """At most `per_class` files of each class, whole groups first (smoke runs)."""
        if not per_class:
            return self
        rng = np.random.default_rng(seed)
        targets = np.asarray(self.targets)
        keep = np.concatenate([rng.permutation(np.flatnonzero(targets == k))[:per_class]
                               for k in np.unique(targets)]) if len(targets) else []
        return self.subset(sorted(int(i) for i in keep))


class DataError(ValueError):
    """A data folder is missing or not laid out as expected (the message says which and how)."""


def _class_index(labels: list[str]) -> dict[str, int]:
    return {label.upper(): i for i, label in enumerate(labels)}


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def split_by_group(targets, groups, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups, per class, so no source photo (or cell) is on both sides."""
    rng = np.random.default_rng(seed)
    targets, groups = np.asarray(targets), np.asarray(groups)
    held = np.zeros(len(targets), bool)
    for label in np.unique(targets):
        class_groups = np.unique(groups[targets == label])
        rng.shuffle(class_groups)
        n_held = max(1, int(round(fraction * len(class_groups)))) if len(class_groups) > 1 else 0
        held |= (targets == label) & np.isin(groups, class_groups[:n_held])
    return np.flatnonzero(~held), np.flatnonzero(held)


def read_kaggle_sources(csv_path: Path) -> dict[str, str]:
    with open(csv_path, newline="") as f:
        return {row["path"]: f"src{row['source_id']}" for row in csv.DictReader(f)}


def kaggle_folder(folder: Path, labels: list[str], sources_csv: Path | None) -> Rows:
    """Every image of a Kaggle folder-per-class directory (TRAIN or TEST), grouped by source photo."""
    _require_dir(folder, "Kaggle image folder")
    index = _class_index(labels)
    sources = read_kaggle_sources(sources_csv) if sources_csv and sources_csv.is_file() else {}
    rows = Rows("kaggle")
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.upper() in index):
        for path in _files(class_dir):
            relative = path.relative_to(folder).as_posix()
            rows.add(path, index[class_dir.name.upper()], sources.get(relative, f"file:{relative}"))
    if not rows:
        raise DataError(f"no images of the classes {labels} under {folder}")
    return rows


def kaggle(data_root: Path, labels: list[str], split: str, val_fraction: float = 0.15,
           seed: int = config.SEED) -> Rows:
    """'train' / 'validation': Kaggle TRAIN split by source photo; 'test': Kaggle TEST."""
    if split == "test":
        return kaggle_folder(data_root / config.KAGGLE_TEST, labels, config.KAGGLE_TEST_SOURCES)
    rows = kaggle_folder(data_root / config.KAGGLE_TRAIN, labels, config.KAGGLE_TRAIN_SOURCES)
    train, val = split_by_group(rows.targets, rows.groups, val_fraction, seed)
    return rows.subset(train if split == "train" else val)


def pbc(data_root: Path, labels: list[str], split: str, split_csv: Path = config.PBC_SPLIT) -> Rows:
    """One split of PBC by the committed split CSV (path,label,split); each image is its own group."""
    folder = _require_dir(data_root / config.PBC, "PBC folder")
    index = _class_index(labels)
    rows = Rows("pbc")
    with open(split_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == split and row["label"].upper() in index:
                rows.add(folder / row["path"], index[row["label"].upper()], row["path"])
    missing = [p for p in rows.paths[:5] if not p.is_file()]
    if missing:
        raise DataError(f"PBC files listed in {split_csv.name} are missing, e.g. {missing[0]}")
    return rows


LISC_FRACTIONS = (0.6, 0.2, 0.2)  # train / validation / test, of the cells of each class


def lisc(data_root: Path, labels: list[str], split: str, seed: int = config.SEED,
         include_unknown: bool = False) -> Rows:
    """One split of the LISC crops, by cell (all shifted crops of a cell on one side), stratified by class.
    With `include_unknown`, the cells of types the model does not know (BASOPHIL) come too, target -1."""
    folder = _require_dir(data_root / config.LISC, "LISC folder")
    groups_csv = folder / config.LISC_GROUPS
    if not groups_csv.is_file():
        raise DataError(f"LISC cell list not found: {groups_csv}")
    index = _class_index(labels)
    with open(groups_csv, newline="") as f:
        table = list(csv.DictReader(f))
    cells: dict[str, list[str]] = {}
    for row in table:
        cells.setdefault(row["label"].upper(), [])
        if row["cell_id"] not in cells[row["label"].upper()]:
            cells[row["label"].upper()].append(row["cell_id"])
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for label in sorted(cells):
        ids = sorted(cells[label])
        order = rng.permutation(len(ids))
        n_train = int(round(LISC_FRACTIONS[0] * len(ids)))
        n_val = int(round(LISC_FRACTIONS[1] * len(ids)))
        for rank, i in enumerate(order):
            split_of[ids[i]] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
    rows = Rows("lisc")
    for row in table:
        label = row["label"].upper()
        if split_of[row["cell_id"]] != split or (label not in index and not include_unknown):
            continue
        rows.add(folder / row["path"], index.get(label, -1), row["cell_id"])
    return rows


LOADERS = {"kaggle": kaggle, "pbc": pbc, "lisc": lisc}


def lab_rows(lab: str, data_root: Path, labels: list[str], split: str, **kwargs) -> Rows:
    return LOADERS[lab](Path(data_root), labels, split, **kwargs)


def recipe_rows(lab: str, data_root: Path, split: str, settings: dict, *, include_unknown: bool = False,
                other_types: bool = False) -> Rows:
    """The rows train.py takes for this lab and split under its `settings` (val_fraction, seed, kaggle_per_photo,
    kaggle_per_class, limit): Kaggle's copies capped per source photo outside TEST (in training, with
    kaggle_per_class, about that many per class instead), at most `limit` files per class. `other_types`:
    only the cells of types the model does not classify (LISC's basophils, target -1)."""
    kwargs = {"val_fraction": settings["val_fraction"], "seed": settings["seed"]} if lab == "kaggle" else {}
    if include_unknown or other_types:
        kwargs["include_unknown"] = True
    rows = lab_rows(lab, data_root, config.LABELS, split, **kwargs)
    if other_types:
        rows = rows.subset(np.flatnonzero(np.asarray(rows.targets) < 0))
    elif lab == "kaggle" and split == "train" and settings.get("kaggle_per_class"):
        rows = rows.per_group_by_class(settings["kaggle_per_class"], settings["seed"])
    elif lab == "kaggle" and split != "test":
        rows = rows.per_group(settings["kaggle_per_photo"], settings["seed"])
    return rows.limit(settings["limit"], settings["seed"])


def check_data_root(data_root: Path, labs) -> None:
    """One clear error for a --data-root that lacks a lab's folder."""
    if not Path(data_root).is_dir():
        raise DataError(f"--data-root not found: {data_root}")
    for lab in labs:
        folder = Path(data_root) / config.LAB_FOLDERS[lab]
        if not folder.is_dir():
            raise DataError(f"{lab}: expected the folder {folder} (the layout of the README's data section)")


def noncell_rows(folder: Path) -> Rows:
    """A non-cell set written by training/experiments/make_noncell_set.py: every image (target -1), grouped by its
    kind, from the folder's manifest.csv."""
    rows = Rows("noncell")
    with open(Path(folder) / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.add(Path(folder) / row["path"], -1, row["kind"])
    return rows


def folder_rows(folder: Path, labels: list[str], include_unknown: bool = False) -> Rows:
    """Any folder with one sub-folder per class (class names in any case); each file its own group. With
    `include_unknown`, the files of other sub-folders (types the model does not know) come too, target -1."""
    _require_dir(folder, "data folder")
    index = _class_index(labels)
    rows = Rows(folder.name)
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name.upper() in index or include_unknown:
            for path in _files(class_dir):
                rows.add(path, index.get(class_dir.name.upper(), -1), path.relative_to(folder).as_posix())
    return rows
