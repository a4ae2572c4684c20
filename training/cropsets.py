"""Labelled files -> the canonical crop of each one's primary white cell, decoded once into memory.

The crops come from hematovision.imaging.primary_crop_file: the same decode, orientation, cell finding and
crop as an upload to the app. Files where no white cell is found are kept out of training and counted; an
evaluation counts them as answered wrongly ("no white cell found").
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hematovision.imaging import IMAGE_SIZE, primary_crop_file
from training.splits import Rows


@dataclass
class CropSet:
    """Crops of the files of `rows` where a white cell was found (`found` marks which)."""

    rows: Rows
    crops: np.ndarray  # (found.sum(), 224, 224, 3) uint8
    found: np.ndarray  # (len(rows),) bool

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.rows.targets, np.int32)[self.found]

    @property
    def groups(self) -> np.ndarray:
        return np.asarray(self.rows.groups)[self.found]

    def draw(self, k: int, seed: int, classes: int) -> np.ndarray:
        """Indices of one random crop of each of k random cells of each class 0..classes-1 (a measurement's
        labelled cells)."""
        rng = np.random.default_rng(seed)
        targets, groups = self.targets, self.groups
        chosen = []
        for label in range(classes):
            cells = rng.permutation(np.unique(groups[targets == label]))[:k]
            chosen += [int(rng.choice(np.flatnonzero(groups == cell))) for cell in cells]
        return np.array(chosen, int)

    def accuracy(self, probabilities: np.ndarray) -> float:
        """Share of all the set's files answered right by these probabilities of its crops (files where no white
        cell was found count as wrong)."""
        return float((probabilities.argmax(1) == self.targets).sum() / len(self.rows))


def _crop(path: Path) -> np.ndarray | None:
    try:
        return primary_crop_file(path)
    except ValueError:  # ImageRejected: an unreadable file is a file without a usable cell
        return None


def _cache_key(rows: Rows) -> str:
    import hematovision.cells as cells

    digest = hashlib.sha256(Path(cells.__file__).read_bytes())
    for path in rows.paths:
        digest.update(str(path).encode())
    return digest.hexdigest()[:16]


def load_crops(rows: Rows, *, workers: int | None = None, cache_dir: Path | None = None,
               desc: str = "") -> CropSet:
    """Crops of every file of `rows`, in parallel processes (cell finding is CPU-bound numpy/SciPy).
    With `cache_dir`, kept there (keyed by the file list and the cell finder's code) for a resumed run."""
    cache = Path(cache_dir) / f"crops_{rows.lab}_{_cache_key(rows)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            return CropSet(rows, data["crops"], data["found"])
    workers = workers or os.cpu_count() or 1
    results: list[np.ndarray | None] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunks = pool.map(_crop, rows.paths, chunksize=32)
        results = list(tqdm(chunks, total=len(rows), desc=desc or rows.lab, unit="img", leave=False,
                            mininterval=2.0))
    found = np.array([r is not None for r in results], bool)
    crops = (np.stack([r for r in results if r is not None]) if found.any()
             else np.zeros((0, *IMAGE_SIZE, 3), np.uint8))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, crops=crops, found=found)
        os.replace(tmp, cache)
    return CropSet(rows, crops, found)


def merge(a: CropSet, b: CropSet) -> CropSet:
    """Two CropSets of one lab as one (e.g. the train and validation cells a measurement draws labelled cells from)."""
    rows = Rows(a.rows.lab, a.rows.paths + b.rows.paths, a.rows.targets + b.rows.targets,
                a.rows.groups + b.rows.groups)
    return CropSet(rows, np.concatenate([a.crops, b.crops]), np.concatenate([a.found, b.found]))


def lab_sets(lab: str, data_root: Path, names=("train", "validation", "test"), *, cache_dir: Path | None = None,
             workers: int | None = None) -> dict[str, CropSet]:
    """The lab's CropSets by split name (LISC: split by cell; PBC: the committed split), the four known types."""
    from training import config, splits

    return {name: load_crops(splits.lab_rows(lab, data_root, config.LABELS, name), workers=workers,
                             cache_dir=cache_dir, desc=f"{lab} {name}") for name in names}
