"""Folder-per-class image sets (as Kaggle's dataset2-master/images/TRAIN): listing and loading."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hematovision.imaging import prepare_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """Files and their integer labels (indices into `labels`)."""

    root: Path
    labels: list[str]
    paths: list[Path] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    skipped_folders: dict[str, int] = field(default_factory=dict)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def counts(self) -> dict[str, int]:
        return {label: self.targets.count(i) for i, label in enumerate(self.labels)}


def list_class_folders(root: str | Path) -> list[str]:
    """Class names of a folder-per-class directory, sorted (the default class order of a new model)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data directory not found: {root}")
    return sorted(p.name.upper() for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(root: str | Path, labels: list[str] | None = None) -> ImageSet:
    """List the images of each class folder. Folder names match labels case-insensitively;
    folders of other classes (e.g. BASOPHIL) are skipped and reported in `skipped_folders`."""
    root = Path(root)
    labels = labels or list_class_folders(root)
    index = {label.upper(): i for i, label in enumerate(labels)}
    image_set = ImageSet(root=root, labels=list(labels))
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if folder.name.upper() not in index:
            image_set.skipped_folders[folder.name] = len(files)
            continue
        image_set.paths.extend(files)
        image_set.targets.extend([index[folder.name.upper()]] * len(files))
    if not image_set.paths:
        raise ValueError(f"No images of the classes {labels} found under {root}")
    return image_set


def load_arrays(paths: list[Path], workers: int | None = None) -> np.ndarray:
    """Decode files into one (N, 224, 224, 3) uint8 array; Pillow releases the GIL, so threads scale."""
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(prepare_file, paths, chunksize=64))
    return np.stack(arrays) if arrays else np.zeros((0, 224, 224, 3), np.uint8)
