"""Paths and defaults shared by the training tools: one place for the data layout, the model path and the seed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT / "training" / "splits"
SHIPPED_MODEL = ROOT / "model" / "blood_cell_model.h5"
SEED = 1337
LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]

# The layout of --data-root (as ../shared/data): one folder per lab.
KAGGLE = "blood-cells"
KAGGLE_TRAIN = Path(KAGGLE, "dataset2-master", "images", "TRAIN")
KAGGLE_TEST = Path(KAGGLE, "dataset2-master", "images", "TEST")
PBC = "pbc-4class"
LISC = "lisc-crops"
LABS = ("kaggle", "pbc", "lisc")
LAB_FOLDERS = {"kaggle": KAGGLE_TRAIN, "pbc": Path(PBC), "lisc": Path(LISC)}

KAGGLE_TRAIN_SOURCES = SPLITS / "kaggle_train_sources.csv"
KAGGLE_TEST_SOURCES = SPLITS / "kaggle_test_sources.csv"
PBC_SPLIT = SPLITS / "pbc_split.csv"
LISC_GROUPS = "groups.csv"  # inside the LISC folder: path,label,cell_id,source_file
BCCD_WBC_BOXES = SPLITS / "bccd_wbc_boxes.csv"

# ImageNet weights on a machine with no connection: the file Keras would download, or its offline equivalent.
OFFLINE_WEIGHTS_HINT = ("pass --weights PATH to a MobileNetV2 'no_top' .h5, e.g. "
                        "mobilenet_v2_1.0_224_coralquant_bnrecal_no_top_legacy.h5 (see the README)")


def display_path(path: str | Path) -> str:
    """A path as recorded in metadata: relative to the repository where it lies inside it, else its last two
    parts, never the training machine's absolute path."""
    path = Path(path)
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return Path(*path.parts[-2:]).as_posix() if len(path.parts) >= 2 else path.name


def command_line(script: str, argv=None) -> str:
    """`python SCRIPT ARGS` as typed (sys.argv's arguments when argv is None), with paths shown as display_path
    shows them: the command a metadata or results file records, never this machine's absolute paths."""
    words = sys.argv[1:] if argv is None else list(argv)
    return f"python {script} " + " ".join(display_path(w) if os.path.isabs(w) else w for w in words)


def write_json(path: str | Path, data) -> None:
    """A measurement's result as indented JSON, its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
