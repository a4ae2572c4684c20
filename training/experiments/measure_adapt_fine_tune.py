"""Would a short fine-tune of the top blocks, after training/adapt.py's statistics and classifier, help a new lab?
Measured on validation cells only, with a model that never saw the lab (a leave-one-lab-out model).

    python training/experiments/measure_adapt_fine_tune.py --lab lisc --base /tmp/lolo3/lisc/blood_cell_model.h5 \
        --seeds 0,1,2,3 --json training/experiments/results/adapt_fine_tune_lisc.json
    python training/experiments/measure_adapt_fine_tune.py --lab pbc --base /tmp/lolo3/pbc/model.h5 \
        --seeds 0,1,2 --json training/experiments/results/adapt_fine_tune_pbc.json

For each draw (CropSet.draw: one crop of each of k cells per class of the lab's train cells, seed s),
adapt.py's steps 1-2 (statistics mix and L2 pull: its defaults; no fine-tune), scored on all crops of the lab's
validation cells as served (the mean over 8 flips/quarter-turns); then, from those weights, each --configs setting:
the layers from `from` on (batch norm frozen) and the classifier trained on augmented copies of the k x 4 crops
(training/augment.py: crop, scale, turns, mirror, light stain and light jitter, blur), Adam with a cosine learning
rate from `lr`, `epochs` passes over `copies` copies of each crop at batch 32; scored the same way, and again with
the weights half-way back to the adapted ones for each `wise` share (weight interpolation, Wortsman et al. 2022).
The test cells are not read. adapt.py's fine-tune (step 3) is the second default setting, its 16 passes of 8
copies of 20 crops at batch 32 being its 80 steps. A setting with "loop": "adapt.py" runs adapt.fine_tune itself
for those steps ("steps" and "batch", a number or "all" of the k x 4 crops, override them; "stain" and "light" its
colour jitter), and with "soup": N keeps the mean of N such runs' weights (seeds 1000 s .. 1000 s + N - 1);
"ensemble": N instead scores each of N such runs and the mean of the first 2 .. N runs' served probabilities (run 0
is adapt.py's).
The later comparisons (results/adapt_fine_tune_depth_{lisc,pbc}.json, adapt_fine_tune_runs_lisc.json,
adapt_fine_tune_deeper_{lisc,pbc}.json, adapt_fine_tune_ensemble_lisc.json) give their exact --configs in
their "command".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from training import config
from training.cropsets import lab_sets

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIGS = json.dumps([
    {"from": "block_13_expand", "lr": 2e-4, "epochs": 8, "copies": 8, "wise": [0.5]},
    {"from": "block_13_expand", "lr": 1e-4, "epochs": 16, "copies": 8, "wise": [0.5]},
])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="a model that never saw --lab")
    p.add_argument("--lab", choices=("lisc", "pbc"), required=True)
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--k", type=int, default=5, help="labelled cells per class")
    p.add_argument("--seeds", default="0,1,2", help="draws of the cells")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="JSON list of fine-tune settings")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/hv_adapt_cache"))
    p.add_argument("--json", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    from hematovision.network import set_trainable_from
    from training import adapt
    from training.augment import augment

    started = time.time()
    sets = lab_sets(args.lab, args.data_root, ("train", "validation"), cache_dir=args.cache_dir)
    train, validation = sets["train"], sets["validation"]
    base = adapt.ResettableModel(args.base)
    def answers(model) -> np.ndarray:
        head = adapt.head_layer(model).get_weights()
        return adapt.served_probabilities(base.runner, validation.crops, head, 8)

    def served(model) -> float:
        return validation.accuracy(answers(model))

    runs: dict[str, list[float]] = {}

    def record(name: str, seed: int, value: float) -> None:
        runs.setdefault(name, []).append(round(value, 4))
        print(f"seed {seed}: {name}: {value:.4f}", flush=True)

    configs = json.loads(args.configs)
    seconds: dict[str, list[float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        chosen = train.draw(args.k, seed, len(config.LABELS))
        crops, targets = train.crops[chosen], train.targets[chosen]
        model = base.fresh()
        set_trainable_from(model, None)
        adapt.adapt(model, crops, targets, fine_tune_steps=0, runner=base.runner, progress=False)
        adapted = [w.copy() for w in model.get_weights()]
        record("adapt.py (statistics + classifier)", seed, served(model))
        for setting in configs:
            name = "fine-tune " + json.dumps({k: v for k, v in setting.items() if k != "wise"})
            batches = int(np.ceil(len(crops) * setting["copies"] / 32))
            clock = time.time()
            answered = []  # "ensemble": each run's served probabilities, scored on their own and averaged
            if setting.get("loop") == "adapt.py":  # adapt.fine_tune itself; "soup": the mean of that many runs'
                members = []  # weights, each from the adapted weights with its own seed (Wortsman et al. 2022)
                for member in range(setting.get("soup", setting.get("ensemble", 1))):
                    model.set_weights(adapted)
                    batch = len(crops) if setting.get("batch") == "all" else setting.get("batch", 32)
                    adapt.fine_tune(model, crops, targets, steps=setting.get("steps") or setting["epochs"] * batches,
                                    first_layer=setting["from"], learning_rate=setting["lr"], batch_size=batch,
                                    seed=1000 * seed + member, progress=False,
                                    **{k: setting[k] for k in ("stain", "light") if k in setting})
                    if setting.get("ensemble"):
                        answered.append(answers(model))
                        record(f"{name}, run {member}", seed, validation.accuracy(answered[-1]))
                    else:
                        members.append(model.get_weights())
                if members:
                    model.set_weights([np.mean(w, axis=0) for w in zip(*members, strict=True)])
            else:  # Keras fit() over `epochs` passes of `copies` augmented copies (the first measurements)
                model.set_weights(adapted)
                set_trainable_from(model, setting["from"])
                model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
                    setting["lr"], setting["epochs"] * batches)), loss="sparse_categorical_crossentropy")
                keras.utils.set_random_seed(seed)  # dropout and fit()'s shuffling
                rng = np.random.default_rng(seed)
                for _ in range(setting["epochs"]):
                    index = np.tile(np.arange(len(crops)), setting["copies"])
                    x = augment(crops[index], 224, rng, stain=0.05, light=0.1, blur=0.2)
                    model.fit(x, targets[index], batch_size=32, epochs=1, verbose=0, shuffle=True)
            seconds.setdefault(name, []).append(round(time.time() - clock, 1))
            for n in range(2, len(answered) + 1):
                record(f"{name}, mean of {n} runs' answers", seed, validation.accuracy(np.mean(answered[:n], axis=0)))
            if not answered:
                tuned = [w.copy() for w in model.get_weights()]
                record(name, seed, served(model))
                for share in setting.get("wise", []):
                    model.set_weights([share * t + (1 - share) * a for t, a in zip(tuned, adapted, strict=True)])
                    record(f"{name}, weights {share:g} of the way from the adapted ones", seed, served(model))
            set_trainable_from(model, None)

    result = {
        "command": config.command_line("training/experiments/measure_adapt_fine_tune.py", argv),
        "lab": args.lab,
        "base_model": config.display_path(args.base),
        "k": args.k,
        "data": "adapted on k cells per class of the lab's train cells; accuracy on all crops of its validation "
                "cells, served as the mean over 8 flips/quarter-turns; the test cells are not read",
        "validation_files": len(validation.rows),
        "by_setting": {name: {"mean": round(float(np.mean(v)), 4), "runs": v} for name, v in runs.items()},
        "fine_tune_seconds": seconds,
        "seconds": round(time.time() - started),
    }
    config.write_json(args.json, result)
    print(json.dumps(result["by_setting"], indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
