"""How much one adaptation's result depends on the order of its fine-tune batches: the same k cells per class of a
lab, adapted with training/adapt.py's adapt() (its defaults) in three orders, scored on the lab's validation cells
(served: the mean over 8 flips/quarter-turns). It chooses nothing; `--split test` draws the cells from the train and
validation cells and scores the test cells, as measure_adaptation.py's step 3 does (draw 7 is that step's draw),
to show how far the command's one run can sit from that script's table.

    python training/experiments/measure_fine_tune_order.py --lab lisc --base /tmp/lolo0/lisc/blood_cell_model.h5 \
        --data-root ../shared/data --from-layers block_13_expand,block_10_expand \
        --json training/experiments/results/fine_tune_order_lisc.json
    python training/experiments/measure_fine_tune_order.py --lab lisc --base /tmp/lolo0/lisc/blood_cell_model.h5 \
        --data-root ../shared/data --from-layers block_13_expand,block_10_expand --split test \
        --json training/experiments/results/fine_tune_order_lisc_test.json
    python training/experiments/measure_fine_tune_order.py --lab pbc --base /tmp/lolo0/pbc/blood_cell_model.h5 \
        --data-root ../shared/data --split test --json training/experiments/results/fine_tune_order_pbc_test.json

The orders: as adapt.py reads a lab's folders (class by class, file names sorted), as drawn, and reversed. The
statistics and the refitted classifier do not depend on the order; the fine-tune's batches (a permutation of the
crops drawn from the seed) do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from training import config
from training.cropsets import lab_sets, merge

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="a model that never saw --lab")
    p.add_argument("--lab", choices=("lisc", "pbc"), required=True)
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--k", type=int, default=5, help="labelled cells per class")
    p.add_argument("--seeds", default="7", help="draws of the cells (CropSet.draw seeds)")
    p.add_argument("--from-layers", default="block_10_expand", help="fine-tune starting layers to compare")
    p.add_argument("--split", choices=("validation", "test"), default="validation", help="the cells scored")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/hv_adapt_cache"))
    p.add_argument("--json", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hematovision.fast_runtime import sha256_of
    from training import adapt

    started = time.time()
    sets = lab_sets(args.lab, args.data_root, cache_dir=args.cache_dir)
    if args.split == "test":  # drawn from train + validation, scored on test (measure_adaptation.py's pool)
        train, validation = merge(sets["train"], sets["validation"]), sets["test"]
    else:
        train, validation = sets["train"], sets["validation"]
    drawn_from = "train" if args.split == "validation" else "train + validation"
    paths = [train.rows.paths[i] for i in np.flatnonzero(train.found)]
    base = adapt.ResettableModel(args.base)
    results = {}
    for layer in args.from_layers.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            chosen = np.asarray(train.draw(args.k, seed, len(config.LABELS)))
            read = chosen[sorted(range(len(chosen)), key=lambda j: (train.targets[chosen[j]], paths[chosen[j]].name))]
            for order, index in (("as adapt.py reads the folders", read), ("as drawn", chosen),
                                 ("reversed", chosen[::-1])):
                model = base.fresh()
                adaptation = adapt.adapt(model, train.crops[index], train.targets[index], fine_tune_from=layer,
                                         runner=base.runner, progress=False)
                accuracy = validation.accuracy(adapt.served_probabilities(base.runner, validation.crops,
                                                                          adaptation.head, 8))
                results.setdefault(layer, {}).setdefault(f"draw {seed}", {})[order] = round(float(accuracy), 4)
                print(f"{layer}, draw {seed}, {order}: {accuracy:.4f}", flush=True)
    config.write_json(args.json, {
        "command": config.command_line("training/experiments/measure_fine_tune_order.py", argv),
        "lab": args.lab,
        "base_model": config.display_path(args.base),
        "base_sha256": sha256_of(args.base),
        "k": args.k,
        "data": (f"adapted on k cells per class of the lab's {drawn_from} cells (one crop each), in three orders; "
                 f"accuracy on all crops of its {args.split} cells, served as the mean over 8 flips/quarter-turns"),
        "scored_files": len(validation.rows),
        "accuracy": results,
        "seconds": round(time.time() - started),
    })
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
