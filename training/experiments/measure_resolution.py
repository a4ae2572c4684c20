"""Is a lower-resolution camera why a model that never saw Kaggle reads its cells as MONOCYTE? Accuracy on PBC's and
LISC's validation rows with each canonical crop taken down to 1/f of its pixels per side and enlarged back (what
the cell crop does to a small cell from a coarser camera), for a model trained without Kaggle; beside it, the
crops' sharpness (mean absolute difference of neighbouring grey levels) and Kaggle's own.

    python training/experiments/measure_resolution.py --data-root ../shared/data \
        --model /tmp/std/seed1_off_kaggle/blood_cell_model.h5 \
        --json training/experiments/results/resolution/resolution.json

Validation rows only (no test rows); the model chose nothing here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training import config
from training.cropsets import lab_sets

ROOT = Path(__file__).resolve().parents[2]
FACTORS = (1, 2, 3, 4, 6)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model trained without Kaggle (--hold-out kaggle)")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/hv_adapt_cache"))
    p.add_argument("--json", type=Path, required=True)
    return p.parse_args(argv)


def coarser(crops: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return crops
    side = crops.shape[1]
    small = round(side / factor)
    return np.stack([np.asarray(Image.fromarray(c).resize((small, small), Image.Resampling.BILINEAR)
                                .resize((side, side), Image.Resampling.BILINEAR)) for c in crops])


def sharpness(crops: np.ndarray) -> float:
    grey = crops.astype(np.float32).mean(axis=-1)
    return float(np.abs(np.diff(grey, axis=1)).mean() + np.abs(np.diff(grey, axis=2)).mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    from hematovision.network import load_model
    from training.adapt import FeatureRunner

    runner = FeatureRunner(load_model(args.model))
    result = {"command": config.command_line("training/experiments/measure_resolution.py", argv),
              "model": config.display_path(args.model), "labels": list(config.LABELS), "labs": {}}
    for lab in ("pbc", "lisc", "kaggle"):
        validation = lab_sets(lab, args.data_root, ("validation",), cache_dir=args.cache_dir)["validation"]
        row = result["labs"][lab] = {"crops": len(validation.crops), "sharpness": {}}
        for factor in (FACTORS if lab != "kaggle" else (1,)):
            crops = coarser(validation.crops, factor)
            row["sharpness"][factor] = round(sharpness(crops), 2)
            if lab == "kaggle":  # the model never saw Kaggle: its figure here is the issue, not the question
                continue
            probabilities, _ = runner(crops)
            confusion = np.zeros((len(config.LABELS),) * 2, int)
            np.add.at(confusion, (validation.targets, probabilities.argmax(1)), 1)
            row.setdefault("accuracy", {})[factor] = round(validation.accuracy(probabilities), 4)
            row.setdefault("confusion", {})[factor] = confusion.tolist()
            print(f"{lab} 1/{factor}: accuracy {row['accuracy'][factor]:.3f}, sharpness {row['sharpness'][factor]}",
                  flush=True)
        print(f"{lab}: sharpness {row['sharpness']}", flush=True)
    config.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
