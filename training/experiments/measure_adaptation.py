"""How much a few labelled cells of a new lab help (training/adapt.py), measured on LISC with a model that never
saw LISC (trained with --hold-out lisc: a leave-one-lab-out model).

    python training/experiments/measure_adaptation.py --base /tmp/hv/lolo_lisc/blood_cell_model.h5 \
        --data-root ../shared/data

LISC is split by cell (training.splits.lisc: 60/20/20 of each class's cells, seed 1337); several shifted crops of
one cell never fall on two sides. An adaptation gets k cells per class, one crop of each (a random one).

1. choose (LISC train -> validation): k cells per class drawn from the train cells, accuracy on all crops of the
   validation cells, for every setting of the grid (share of the lab's batch-norm statistics x L2 pull of the
   refitted classifier towards the base's x test-time views served; "statistics only" and "classifier only"
   (mix 0) among them), k = 1, 5, 20, --seeds draws each. The setting with the best mean validation accuracy is
   chosen. The test cells are not read. The grid has no fine-tune (adapt.py's step 3): that was chosen apart, by
   measure_adapt_fine_tune.py.
2. test (LISC train + validation -> test): the chosen setting, k cells per class drawn from the train and
   validation cells, accuracy on all crops of the test cells (a crop where no white cell is found counts as
   wrong); k = 0 is the base model as it is. k = 1 calls training.adapt.adapt() itself: the command wants at least
   2 images per class.
3. command: training/adapt.py run as a user runs it (its own process, the LISC crop files of 5 and 20 cells per
   class copied into class folders), timed, and the model it writes served through load_classifier (TFLite, its
   calibration and "uncertain" rule) on the test cells; with the share left unanswered ("uncertain", or no white
   cell found) of LISC's test basophils (a type the model does not know) and, with --noncell-dir
   (training/experiments/make_noncell_set.py), of images that are not white cells, beside the base's own.

Writes training/experiments/results/adaptation.json (--json). The statistics mix and L2 pull adapt.py use were
chosen on both labs' validation cells at k = 5 (each with the model that never saw it;
results/adaptation_choose_{lisc,pbc}.json; the setting with the best mean over the two labs):

    python training/experiments/measure_adaptation.py --lab pbc --base /tmp/lolo/pbc/blood_cell_model.h5 \
        --ks 5 --seeds 3 --mixes 0,0.5,0.75 --l2s 1e-5,1e-4,1e-3 --served-views 8 --command-ks "" \
        --json training/experiments/results/adaptation_choose_pbc.json

and adapt.py's defaults then measured on each lab's test cells (the README's table):

    python training/experiments/measure_adaptation.py --lab lisc --skip-choose --ks 1,5,20 --seeds 3 \
        --command-ks 5,20 --base /tmp/lolo/lisc/blood_cell_model.h5 --noncell-dir /tmp/hv_noncell \
        --json training/experiments/results/adaptation_lisc.json
    python training/experiments/measure_adaptation.py --lab pbc --skip-choose --ks 1,5,20 --seeds 2 \
        --command-ks 5 --base /tmp/lolo/pbc/blood_cell_model.h5 \
        --json training/experiments/results/adaptation_pbc.json
    python training/experiments/measure_adaptation.py --lab pbc --skip-choose --ks 5 --seeds 5 --command-ks "" \
        --base /tmp/lolo/pbc/blood_cell_model.h5 --json training/experiments/results/adaptation_pbc_k5.json

(the last: PBC at k = 5 with 5 draws instead of 2, the README's figure; its first two draws are the earlier two)

PBC's split is the committed one (training/splits/pbc_split.csv), each image its own "cell". --threads limits
TensorFlow's CPU threads here; the timed command of step 3 runs on --command-cores CPU cores (all by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hematovision.fast_runtime import sha256_of
from training import config, splits
from training.cropsets import lab_sets, load_crops, merge
from training.metrics import wilson_interval

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "base": config.SHIPPED_MODEL,
    "data_root": ROOT.parent / "shared" / "data",
    "json": ROOT / "training" / "experiments" / "results" / "adaptation.json",
    "ks": "1,5,20",
    "seeds": 3,
    "mixes": "0,0.5,0.75,1",
    "l2s": "1e-6,1e-5,1e-4,1e-3",
    "served_views": "1,8",
    "command_ks": "5,20",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=DEFAULTS["base"], help="a model that never saw LISC")
    p.add_argument("--data-root", type=Path, default=DEFAULTS["data_root"], help="holds lisc-crops/ (pbc-4class/)")
    p.add_argument("--lab", choices=("lisc", "pbc"), default="lisc",
                   help="the lab adapted to (the base model must never have seen it)")
    p.add_argument("--json", type=Path, default=DEFAULTS["json"])
    p.add_argument("--ks", default=DEFAULTS["ks"], help="labelled cells per class")
    p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="draws of the cells for each k")
    p.add_argument("--mixes", default=DEFAULTS["mixes"], help="grid: share of the lab's batch-norm statistics")
    p.add_argument("--l2s", default=DEFAULTS["l2s"], help="grid: L2 pull of the refitted classifier")
    p.add_argument("--served-views", default=DEFAULTS["served_views"],
                   help="grid: test-time views the adapted model is served with (its metadata's test_time_views)")
    p.add_argument("--command-ks", default=DEFAULTS["command_ks"], help="images per class of the timed commands")
    p.add_argument("--command-cores", type=int, default=0, help="CPU cores of the timed command (0: all)")
    p.add_argument("--noncell-dir", type=Path, help="make_noncell_set.py's folder: non-cells left unanswered")
    p.add_argument("--threads", type=int, default=0, help="TensorFlow CPU threads here (0: all)")
    p.add_argument("--skip-choose", action="store_true",
                   help="measure training/adapt.py's defaults instead of choosing a setting on this lab")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "hv_adapt_cache")
    return p.parse_args(argv)


def summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "min": float(np.min(values)),
            "runs": [round(v, 4) for v in values]}


def choose(base, train, validation, ks, seeds, mixes, l2s, views_served) -> dict:
    """Validation accuracy of every setting of the grid; the setting with the best mean over k and draws."""
    from hematovision.classifier import symmetric_views
    from training import adapt

    scores: dict[str, list[float]] = {}
    by_k: dict[str, dict[int, list[float]]] = {}
    settings: dict[str, dict] = {}

    def record(name: str, k: int, value: float, setting: dict | None = None) -> None:
        scores.setdefault(name, []).append(value)
        by_k.setdefault(name, {}).setdefault(k, []).append(value)
        if setting:
            settings[name] = setting

    base.fresh()
    base_probabilities, _ = base.runner(validation.crops)
    most = max(views_served)
    for k in ks:
        for seed in range(seeds):
            chosen = train.draw(k, seed, len(config.LABELS))
            for mix in mixes:
                model = base.fresh()
                adaptation = adapt.adapt(model, train.crops[chosen], train.targets[chosen], stats_mix=mix,
                                         head_l2=l2s[0], fine_tune_steps=0, runner=base.runner, progress=False)
                features = [base.runner(view)[1] for view in symmetric_views(validation.crops, most)]
                if mix:
                    record(f"statistics only, mix {mix:g}", k,
                           validation.accuracy(adapt.softmax_of(features[0], adaptation.base_head)))
                flat = adaptation.features.reshape(-1, adaptation.features.shape[-1])
                for l2 in l2s:
                    head = adapt.fit_head(flat, np.repeat(adaptation.targets, adaptation.features.shape[1]),
                                          adaptation.base_head, l2)
                    for views in views_served:
                        probabilities = np.mean([adapt.softmax_of(f, head) for f in features[:views]], axis=0)
                        record(f"mix {mix:g}, l2 {l2:g}, served views {views}", k,
                               validation.accuracy(probabilities),
                               {"stats_mix": mix, "head_l2": l2, "test_time_views": views})
            record("base", k, validation.accuracy(base_probabilities))
            print(f"  choose: k={k} seed={seed}: best so far "
                  f"{max(settings, key=lambda n: np.mean(scores[n]))}", flush=True)
    best = max(settings, key=lambda n: np.mean(scores[n]))
    return {
        "data": "adapt on k cells per class of the lab's train cells, measured on all crops of its validation cells",
        "grid": {"stats_mix": mixes, "head_l2": l2s, "test_time_views": views_served,
                 "note": "'statistics only': the base's classifier on the adapted statistics, one view"},
        "chosen": {"name": best, **settings[best]},
        "settings": {name: {"mean": float(np.mean(v)),
                            "by_k": {str(k): summary(x) for k, x in by_k[name].items()}}
                     for name, v in sorted(scores.items(), key=lambda item: -np.mean(item[1]))},
    }


def test(base, pool, test_set, ks, seeds, setting: dict) -> dict:
    """Test accuracy of the chosen setting for each k (0: the base model as it is served), and the seconds of
    each adaptation (statistics, features of the views, classifier; not reading files nor writing the model)."""
    from training import adapt

    results = {}
    base.fresh()
    base_probabilities, _ = base.runner(test_set.crops)
    results["0"] = {"accuracy": summary([test_set.accuracy(base_probabilities)]), "seconds": None}
    for k in ks:
        values, seconds = [], []
        for seed in range(seeds):
            chosen = pool.draw(k, 100 + seed, len(config.LABELS))
            model = base.fresh()
            started = time.perf_counter()
            adaptation = adapt.adapt(model, pool.crops[chosen], pool.targets[chosen],
                                     stats_mix=setting["stats_mix"], head_l2=setting["head_l2"],
                                     fine_tune_steps=setting.get("fine_tune_steps", 0), runner=base.runner,
                                     progress=False)
            seconds.append(time.perf_counter() - started)
            probabilities = adapt.served_probabilities(base.runner, test_set.crops, adaptation.head,
                                                       setting["test_time_views"])
            values.append(test_set.accuracy(probabilities))
            print(f"  test: k={k} seed={seed}: {values[-1]:.3f} ({seconds[-1]:.0f} s)", flush=True)
        results[str(k)] = {"accuracy": summary(values), "seconds": summary(seconds)}
    return results


def unanswered(classifier, cropset) -> dict:
    """Share of the set's files the app gives no class: no white cell found, or "uncertain"."""
    flags = np.ones(len(cropset.rows), bool)
    if cropset.found.any():
        flags[cropset.found] = classifier.assess(cropset.crops).uncertain
    low, high = wilson_interval(int(flags.sum()), len(flags))
    return {"n": len(flags), "rate": float(flags.mean()), "ci95": [low, high]}


def served(classifier, test_set, others: dict) -> dict:
    from training import pipeline

    figures = pipeline.assess_crops(classifier, test_set)
    result = {key: figures[key] for key in ("n", "accuracy", "accuracy_ci95", "macro_f1", "abstention_rate",
                                            "abstained_by_reason", "accuracy_answered", "ece")}
    return {"test": result, **{f"unanswered_{name}": unanswered(classifier, crops) for name, crops in others.items()}}


def command(base_path: Path, pool, test_set, others: dict, k: int, setting: dict, cores: int,
            workdir: Path) -> dict:
    """training/adapt.py in its own process on k of the lab's files per class, timed; its model served on the
    test set through load_classifier (TFLite, calibration, "uncertain" rule)."""
    from hematovision.classifier import load_classifier

    chosen = pool.draw(k, 7, len(config.LABELS))
    data = workdir / f"lab_{k}"
    for i in chosen:
        path = pool.rows.paths[np.flatnonzero(pool.found)[i]]
        folder = data / config.LABELS[pool.targets[i]].lower()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    out = workdir / f"adapted_{k}" / "model.h5"
    line = [sys.executable, str(ROOT / "training" / "adapt.py"), "--data-dir", str(data), "--out", str(out),
            "--base", str(base_path), "--stats-mix", str(setting["stats_mix"]), "--head-l2", str(setting["head_l2"]),
            "--test-time-views", str(setting["test_time_views"]),
            "--fine-tune-steps", str(setting.get("fine_tune_steps", 0))]
    if cores:
        line = ["taskset", "-c", ",".join(str(c) for c in range(cores))] + line
    started = time.perf_counter()
    done = subprocess.run(line, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"adapt.py failed ({done.returncode}): {done.stderr[-2000:]}")
    classifier = load_classifier(out)
    result = served(classifier, test_set, others)
    figures = json.loads(out.with_suffix(".json").read_text())["adaptation"]["figures"]
    print(f"  command: k={k}: {seconds:.0f} s, served test accuracy {result['test']['accuracy']:.3f}, answered "
          f"{1 - result['test']['abstention_rate']:.1%}, leave-one-out {figures['accuracy']:.3f}", flush=True)
    return {"images_per_class": k, "seconds": round(seconds, 1), "cores": cores or os.cpu_count(),
            "runtime": classifier.runtime, **result,
            "leave_one_out": {key: figures[key] for key in ("n", "accuracy", "accuracy_ci95")}}


def abstention_sets(args) -> dict:
    """LISC's test basophils (a type the model does not know), and the non-cell images when --noncell-dir is
    given, as CropSets."""
    others = {}
    if (args.data_root / config.LISC).is_dir():
        lisc = splits.lisc(args.data_root, config.LABELS, "test", include_unknown=True)
        others["lisc_basophils_test"] = lisc.subset([i for i, t in enumerate(lisc.targets) if t < 0])
    if args.noncell_dir:
        others["noncells"] = splits.noncell_rows(args.noncell_dir)
    return {name: load_crops(rows, workers=args.threads or None, cache_dir=args.cache_dir, desc=name)
            for name, rows in others.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from training import adapt

    started = time.time()
    ks = [int(k) for k in args.ks.split(",")]
    sets = lab_sets(args.lab, args.data_root, cache_dir=args.cache_dir, workers=args.threads or None)
    for split, crops in sets.items():
        print(f"{args.lab} {split}: {len(crops.rows)} files of {len(set(crops.rows.groups))} cells, white cell found "
              f"in {int(crops.found.sum())}", flush=True)
    base = adapt.ResettableModel(args.base)
    base_metadata = json.loads(args.base.with_suffix(".json").read_text())
    result = {
        "command": config.command_line("training/experiments/measure_adaptation.py", argv),
        "lab": args.lab,
        "base_model": config.display_path(args.base),
        "base_held_out_lab": (base_metadata.get("training") or {}).get("held_out_lab"),
        "base_sha256": sha256_of(args.base),
        "cells": {split: len(set(c.rows.groups)) for split, c in sets.items()},
        "files": {split: len(c.rows) for split, c in sets.items()},
        "cell_draws": "one random file of each of k random cells per class; seeds 0.. (choose), 100.. (test), 7 "
                      "(command)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, TensorFlow threads {args.threads or 'all'}",
    }
    defaults = {"stats_mix": adapt.DEFAULTS["stats_mix"], "head_l2": adapt.DEFAULTS["head_l2"],
                "test_time_views": adapt.DEFAULTS["test_time_views"],
                "fine_tune_steps": adapt.DEFAULTS["fine_tune_steps"]}
    if args.skip_choose:
        setting = defaults
        result["choose"] = {"chosen": {"name": "training/adapt.py's defaults (not chosen on this lab)", **setting}}
    else:
        print(f"1. choose, on {args.lab} validation cells", flush=True)
        result["choose"] = choose(base, sets["train"], sets["validation"], ks, args.seeds,
                                  [float(m) for m in args.mixes.split(",")], [float(v) for v in args.l2s.split(",")],
                                  [int(v) for v in args.served_views.split(",")])
        setting = {key: result["choose"]["chosen"].get(key, 0) for key in defaults}  # the grid: no fine-tune
        print(f"   chosen: {result['choose']['chosen']['name']}", flush=True)
        if setting != defaults:
            print(f"   note: training/adapt.py's defaults {defaults} are not the chosen setting", flush=True)
    pool = merge(sets["train"], sets["validation"])
    print(f"2. test, on {args.lab} test cells", flush=True)
    result["test"] = {"setting": setting,
                      "data": "adapt on k cells per class of the lab's train+validation cells, measured on all files "
                              "of its test cells (a file where no white cell is found counts as wrong); k = 0: the "
                              "base model as it is served",
                      "by_k": test(base, pool, sets["test"], ks, args.seeds, setting)}
    n_test = len(sets["test"].rows)
    for figures in result["test"]["by_k"].values():
        low, high = wilson_interval(round(figures["accuracy"]["mean"] * n_test), n_test)
        figures["accuracy"]["ci95_of_mean"] = [low, high]
    print("3. the command itself, timed", flush=True)
    from hematovision.classifier import load_classifier

    others = abstention_sets(args)
    result["base_served"] = served(load_classifier(args.base), sets["test"], others)
    workdir = Path(tempfile.mkdtemp(prefix="hv_adapt_"))
    try:
        result["command_runs"] = [command(args.base, pool, sets["test"], others, int(k), setting, args.command_cores,
                                          workdir) for k in args.command_ks.split(",") if k]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.time() - started)
    config.write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
