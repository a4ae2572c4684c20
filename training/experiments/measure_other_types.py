"""The "another type of white cell" test (hematovision.abstention.OtherTypes): how its regularisation was chosen,
and what it flags. LISC's basophils are the other type; their validation cells choose, their test cells are
measured once, with the chosen setting.

    python training/experiments/measure_other_types.py --data-root ../shared/data \
        --json training/experiments/results/other_types_choice.json
    python training/experiments/measure_other_types.py --data-root ../shared/data --regularisations 0.4 \
        --json training/experiments/results/other_types.json
    python training/experiments/measure_other_types.py --data-root ../shared/data \
        --model /tmp/lolo/pbc/blood_cell_model.h5 --json training/experiments/results/other_types_lolo_pbc.json

For each C (logistic regression's regularisation, abstention.fit_other_types) the score is fitted on the model's
pooled features of its training crops (one random flip/quarter-turn each, as train.py fits the rule) against LISC's
training basophils; its threshold flags at most --rate of each training lab's known validation cells (as train.py
sets it); the share of LISC's validation basophils it flags chooses C. Then, for the chosen C only: LISC's test
basophils flagged, and the share of known cells flagged on each lab's test rows. For a model trained with a lab
held out (--model of a `--hold-out` run), that lab's validation cells are scored too: known cells of a lab the
model never saw, which the test should not flag. Last, `threshold_rules`: train.py's threshold rule beside looser
ones, for the chosen C (what each flags of the validation basophils, the known validation cells and, for a
leave-one-lab-out model, the never-seen lab's validation cells).

other_types_choice.json chose abstention.OTHER_TYPES_REGULARISATION on the model shipped before the test existed
(its sha256 is in the file); other_types.json measures the shipped model, retrained with the test, at that C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from training import config, splits
from training.cropsets import load_crops


def cost_on_unseen_lab(crops, answer, score, threshold) -> dict:
    """The model's answers on a lab it never saw, served without the other-type test ("served") and with the test
    fitted here added (cells where no white cell was found are left out: the test cannot change them)."""
    right = answer.probabilities.argmax(1) == crops.targets
    served = answer.uncertain
    added = (score.scores(answer.features) > threshold) & ~served
    both = served | added
    return {"n": int(len(right)), "answered_served": float((~served).mean()),
            "right_when_answered_served": float(right[~served].mean()),
            "flagged_by_the_test": float((score.scores(answer.features) > threshold).mean()),
            "answered_with_the_test": float((~both).mean()),
            "right_when_answered_with_the_test": float(right[~both].mean()),
            "newly_flagged": int(added.sum()),
            "right_among_newly_flagged": float(right[added].mean()) if added.any() else None}


MEAN_RATES = (0.005, 0.01, 0.02)  # threshold rules compared with train.py's, on validation rows only


def threshold_rules(score, threshold: float, validation: dict, basophils: np.ndarray, unseen: dict,
                    rate: float) -> dict:
    """train.py's `threshold` (at most `rate` of each lab's validation cells flagged: with LISC's 187 crops of 43
    cells that allows none, so its highest-scoring crop sets it) beside looser ones (the lowest threshold whose
    flagged share, averaged over the labs, is at most r): what each flags of LISC's validation basophils, of each
    lab's known validation cells and, for a leave-one-lab-out model, of the never-seen lab's validation cells."""
    scores = {lab: score.scores(f) for lab, f in validation.items()}

    def mean_flagged(t: float) -> float:
        return float(np.mean([(s > t).mean() for s in scores.values()]))

    candidates = np.unique(np.concatenate(list(scores.values())))
    rules = {f"each lab at most {rate:g} (train.py)": threshold}
    for mean_rate in MEAN_RATES:
        rules[f"mean over labs at most {mean_rate:g}"] = float(min(t for t in candidates
                                                                   if mean_flagged(t) <= mean_rate))
    return {name: {"threshold": t,
                   "lisc_validation_basophils_flagged": float((score.scores(basophils) > t).mean()),
                   "known_validation_flagged": {lab: float((s > t).mean()) for lab, s in scores.items()},
                   "never_seen_lab_validation_flagged": {lab: float((score.scores(f) > t).mean())
                                                         for lab, f in unseen.items()}}
            for name, t in rules.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", type=Path, default=config.SHIPPED_MODEL)
    p.add_argument("--crop-cache", type=Path, help="train.py's --crop-cache folder, to skip finding the cells again")
    p.add_argument("--regularisations", default="0.05,0.1,0.2,0.4,0.8,1.6", help="values of C to try")
    p.add_argument("--rate", type=float, default=0.005, help="share of each lab's known validation cells flagged")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from hematovision import abstention
    from hematovision.classifier import load_classifier
    from training import pipeline

    classifier = load_classifier(args.model)
    settings = classifier.metadata["training"]["settings"]
    labs, held_out = settings["labs"], settings.get("hold_out")
    if "lisc" not in labs or held_out == "lisc":
        print("measure_other_types.py: the model must be trained on LISC (its basophils are the other type)",
              file=sys.stderr)
        return 2

    def features(part, one_view: bool):
        crops = load_crops(part, cache_dir=args.crop_cache, desc=part.lab)
        return pipeline.outputs(classifier, crops.crops, one_view_seed=settings["seed"] if one_view else None)[1]

    def rows(lab: str, split: str, **kwargs):
        return splits.recipe_rows(lab, args.data_root, split, settings, **kwargs)

    train = {lab: features(rows(lab, "train"), True) for lab in labs}
    validation = {lab: features(rows(lab, "validation"), False) for lab in labs}
    test = {lab: features(rows(lab, "test"), False) for lab in labs}
    other = {split: features(rows("lisc", split, other_types=True), split == "train")
             for split in ("train", "validation", "test")}
    unseen = {}
    if held_out:  # known cells of a lab the model never saw: what the test costs there (features, answers)
        crops = load_crops(rows(held_out, "validation"), cache_dir=args.crop_cache, desc=held_out)
        # served without its own other-type test (a model trained since the test exists has one): the test is added
        without = dataclasses.replace(classifier, rule=dataclasses.replace(classifier.rule, other=None))
        unseen[held_out] = (crops, without.assess(crops.crops))
    known_train = np.concatenate(list(train.values()))

    def fit(c: float):
        score = abstention.fit_other_types(known_train, other["train"], ("BASOPHIL",), regularisation=c)
        threshold = max(abstention.threshold_for_rate(score.scores(f), args.rate) for f in validation.values())
        return score, threshold

    def flagged(score, threshold, f) -> float:
        return float((score.scores(f) > threshold).mean()) if len(f) else float("nan")

    grid = {}
    for c in [float(v) for v in args.regularisations.split(",")]:
        score, threshold = fit(c)
        grid[f"{c:g}"] = {"threshold": threshold,
                          "lisc_validation_basophils_flagged": flagged(score, threshold, other["validation"]),
                          "known_validation_flagged": {lab: flagged(score, threshold, f)
                                                      for lab, f in validation.items()}}
        print(f"C {c:g}: validation basophils flagged {grid[f'{c:g}']['lisc_validation_basophils_flagged']:.3f}",
              flush=True)
    chosen = max(grid, key=lambda c: (grid[c]["lisc_validation_basophils_flagged"], -float(c)))
    score, threshold = fit(float(chosen))
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "model": config.display_path(args.model),
        "model_sha256": classifier.sha256,
        "model_labs": labs,
        "held_out_lab": held_out,
        "rate": args.rate,
        "basophil_crops": {split: int(len(f)) for split, f in other.items()},
        "grid": grid,
        "chosen": {"regularisation": float(chosen), "on": "the share of LISC's validation basophils flagged (ties: "
                                                          "the smaller C)"},
        "test": {"lisc_test_basophils_flagged": flagged(score, threshold, other["test"]),
                 "known_test_flagged": {lab: flagged(score, threshold, f) for lab, f in test.items()}},
        "held_out_lab_validation": {lab: cost_on_unseen_lab(crops, answer, score, threshold)
                                    for lab, (crops, answer) in unseen.items()},
    }
    never_seen = {lab: answer.features for lab, (_, answer) in unseen.items()}
    result["threshold_rules"] = threshold_rules(score, threshold, validation, other["validation"], never_seen,
                                                args.rate)
    print(json.dumps({k: result[k] for k in ("chosen", "test", "held_out_lab_validation", "threshold_rules")},
                     indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
