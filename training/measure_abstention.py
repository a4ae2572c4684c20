"""Measure the "uncertain / not a white blood cell" answer and the calibration of a model on held-out sets.

    python training/make_noncell_set.py --bccd-dir ../shared/data/blood-cells/dataset-master --out /tmp/hv_noncell
    python training/measure_abstention.py --noncell-dir /tmp/hv_noncell \
        --kaggle-test ../shared/data/blood-cells/dataset2-master/images/TEST --pbc-dir ../shared/data/pbc-4class \
        --json model/eval_abstention.json

About 3-7 minutes on 2 CPU cores (3,500 images through the model's test-time views). Reports, with 95% Wilson
intervals:
- the non-cell set (make_noncell_set.py): the share answered "uncertain", overall and per kind (target >= 0.90);
- Kaggle TEST and the PBC `test` rows of training/splits/pbc_split.csv: the share answered "uncertain" (target
  <= 0.02 each), the accuracy on the answered images and on all, and the expected calibration error (15 bins)
  before and after the model's temperature.
Nothing here is fitted or chosen: the parameters come from training/fit_abstention.py (validation data only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {"model": ROOT / "model" / "blood_cell_model.h5",
            "pbc_split": ROOT / "training" / "splits" / "pbc_split.csv"}
TARGETS = {"noncell_min_flag_rate": 0.90, "cells_max_flag_rate": 0.02}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noncell-dir", type=Path, help="made by training/make_noncell_set.py (with its manifest.csv)")
    p.add_argument("--kaggle-test", type=Path, help="Kaggle dataset2-master/images/TEST (folder per class)")
    p.add_argument("--pbc-dir", type=Path, help="the PBC set; its test rows of --pbc-split are measured")
    p.add_argument("--pbc-split", type=Path, default=DEFAULTS["pbc_split"])
    p.add_argument("--model", type=Path, default=DEFAULTS["model"])
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if not (args.noncell_dir or args.kaggle_test or args.pbc_dir):
        p.error("give at least one of --noncell-dir, --kaggle-test, --pbc-dir")
    return args


def rate(flags: np.ndarray) -> dict:
    from training.evaluate import wilson_interval

    hits, n = int(np.sum(flags)), int(len(flags))
    low, high = wilson_interval(hits, n)
    return {"n": n, "flagged": hits, "rate": hits / n if n else 0.0, "ci95": [low, high]}


def measure_noncell(classifier, folder: Path, batch_size: int) -> dict:
    from training.evaluate import assess_files, count_reasons

    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    answers = assess_files(classifier, [folder / row["path"] for row in rows], batch_size)
    flags = np.array([r is not None for r in answers["reasons"]])
    kinds = np.array([row["kind"] for row in rows])
    result = {**rate(flags), "by_reason": count_reasons(answers["reasons"]),
              "per_kind": {kind: rate(flags[kinds == kind]) for kind in dict.fromkeys(kinds)}}
    missed = [rows[i]["path"] for i in np.flatnonzero(~flags)]
    result["not_flagged"] = missed
    return result


def measure_cells(classifier, image_set, batch_size: int) -> dict:
    from training.evaluate import assess_files, summarise_abstention

    answers = assess_files(classifier, image_set.paths, batch_size)
    y = np.asarray(image_set.targets)
    flags = np.array([r is not None for r in answers["reasons"]])
    figures = summarise_abstention(y, answers["raw"], answers["probabilities"], answers["reasons"],
                                   classifier.labels)
    return {**rate(flags), "by_reason": figures["abstained_by_reason"],
            "accuracy_all": float((answers["probabilities"].argmax(1) == y).mean()),
            **{k: figures[k] for k in ("accuracy_answered", "accuracy_answered_ci95", "ece_uncalibrated", "ece",
                                       "log_loss_uncalibrated", "log_loss", "confusion_matrix_with_uncertain")}}


def format_line(name: str, r: dict) -> str:
    low, high = r["ci95"]
    text = f"{name:<14} flagged {r['flagged']:>4} / {r['n']:<5} = {r['rate']:.3f} ({low:.3f}-{high:.3f})"
    if "ece" in r:
        text += (f"   accuracy answered {r['accuracy_answered']:.4f} (all {r['accuracy_all']:.4f})   "
                 f"ECE {r['ece_uncalibrated']:.4f} -> {r['ece']:.4f}")
    if r.get("by_reason"):
        text += "   " + ", ".join(f"{k}: {v}" for k, v in r["by_reason"].items())
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hematovision.classifier import load_classifier
    from hematovision.datasets import list_images
    from training.evaluate import split_rows

    classifier = load_classifier(args.model)
    rule = classifier.rule
    if rule.density is None:
        print("WARNING: this model has no fitted distance rule (run training/fit_abstention.py): only the plain "
              "confidence threshold is measured.")
    result = {
        "model": args.model.name,
        "temperature": classifier.temperature,
        "temperature_distance_slope": classifier.calibration.slope,
        "min_probability": rule.min_probability,
        "max_distance": rule.max_distance,
        "targets": TARGETS,
    }
    started = time.time()
    if args.noncell_dir:
        result["noncell"] = measure_noncell(classifier, args.noncell_dir, args.batch_size)
        result["noncell"]["dir"] = args.noncell_dir.as_posix()
    if args.kaggle_test:
        result["kaggle_test"] = measure_cells(classifier, list_images(args.kaggle_test, classifier.labels),
                                              args.batch_size)
    if args.pbc_dir:
        result["pbc_test"] = measure_cells(
            classifier, split_rows(args.pbc_dir, args.pbc_split, "test", classifier.labels), args.batch_size)
    result["seconds"] = round(time.time() - started, 1)

    print(f"temperature {classifier.calibration}, min_probability {rule.min_probability}, "
          f"max_distance {rule.max_distance}")
    checks = []
    if "noncell" in result:
        r = result["noncell"]
        print(format_line("non-cell", r))
        for kind, k in r["per_kind"].items():
            print(f"  {kind:<12} {k['flagged']:>4} / {k['n']:<4} = {k['rate']:.3f}")
        checks.append(("non-cell flag rate >= 0.90", r["rate"] >= TARGETS["noncell_min_flag_rate"]))
    for key, name in (("kaggle_test", "Kaggle TEST"), ("pbc_test", "PBC test")):
        if key in result:
            print(format_line(name, result[key]))
            checks.append((f"{name} flag rate <= 0.02", result[key]["rate"] <= TARGETS["cells_max_flag_rate"]))
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    result["checks"] = {text: ok for text, ok in checks}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
