"""Is the mean of the last few epochs' weights better than the best single epoch? Validation rows only.

Reads the per-epoch weights a train.py run keeps in its checkpoint folder (`<phase>_<epoch>.weights.h5`; kept
after the run with --keep-checkpoint), and scores, on each lab's validation rows exactly as train.py selects
them, every single epoch and the mean of the last N epochs' weights, for runs that stop after E epochs:

    python training/train.py --data-root ../shared/data --weights W.h5 --out /tmp/x/m.h5 --high-epochs 4 \
        --keep-checkpoint
    python training/experiments/measure_weight_average.py --data-root ../shared/data \
        --checkpoint /tmp/x/m.checkpoint --json training/experiments/results/weight_average.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training import config, splits
from training.cropsets import load_crops
from training.pipeline import validation_scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True, help="a train.py run's <out>.checkpoint folder")
    p.add_argument("--crop-cache", type=Path)
    p.add_argument("--windows", default="2,3,4,5,6", help="numbers of last epochs to average")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from hematovision.network import build_model

    state = json.loads((args.checkpoint / "state.json").read_text(encoding="utf-8"))
    settings = state["settings"]
    val = {}
    for lab in settings["labs"]:  # the validation rows exactly as train.py's gather() takes them
        crops = load_crops(splits.recipe_rows(lab, args.data_root, "validation", settings),
                           cache_dir=args.crop_cache or args.checkpoint / "crops", desc=f"{lab} validation")
        val[lab] = (crops.crops, crops.targets)
    names = [f"{h['phase']}_{h['epoch']}" for h in state["history"] if h["phase"] != "head"]
    model = build_model(len(config.LABELS), weights=None, dropout=settings["dropout"])
    weights = {}
    for name in names:
        model.load_weights(args.checkpoint / f"{name}.weights.h5")
        weights[name] = model.get_weights()

    def score(members: list[str]) -> dict:
        model.set_weights([np.mean(parts, axis=0) for parts in zip(*(weights[m] for m in members), strict=True)])
        scores = validation_scores(model, val)
        return {"members": members, "val_accuracy": scores, "val_mean": float(np.mean(list(scores.values())))}

    result: dict = {"checkpoint": args.checkpoint.name, "settings": settings, "single": {}, "runs": {}}
    for name in names:
        result["single"][name] = score([name])
        print(f"{name}: {result['single'][name]['val_mean']:.4f} {result['single'][name]['val_accuracy']}",
              flush=True)
    low = sum(1 for n in names if n.startswith("low_"))
    for end in range(low + 1, len(names) + 1):  # runs with 1, 2, ... high epochs
        upto = names[:end]
        best = max(upto, key=lambda n: result["single"][n]["val_mean"])
        run = {"best_single": {"epoch": best, **result["single"][best]}, "averages": {}}
        for n in (int(w) for w in args.windows.split(",")):
            if n <= len(upto):
                run["averages"][n] = score(upto[-n:])
                print(f"{end - low} high epoch(s), mean of last {n}: {run['averages'][n]['val_mean']:.4f} "
                      f"{run['averages'][n]['val_accuracy']} (best single {best}: "
                      f"{run['best_single']['val_mean']:.4f})", flush=True)
        result["runs"][f"high_epochs_{end - low}"] = run
    if args.json:
        config.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
