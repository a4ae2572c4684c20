"""Evaluate a HematoVision model on labelled images, through the same cell finding, crop, model, calibration and
"uncertain" rule as the app.

    python training/evaluate.py --model model/blood_cell_model.h5 --data-root ../shared/data --lab pbc --split test
    python training/evaluate.py --model my_lab_model.h5 --data-dir my_lab_cells/ --json figures.json

--data-dir is any folder with one sub-folder per class (the class names in any case; other folders, such as
BASOPHIL, are counted as "unknown type"). --data-root/--lab/--split take one split of a lab as training/splits.py
defines it (train.py already evaluates the test rows of every lab at the end of a run). Each image is answered
by its primary white cell (nearest the centre); an image where no white cell is found counts as wrong. Prints
and writes: accuracy with its 95% Wilson interval, macro-F1, per-class figures and the confusion matrix, the
calibration error, and how many images were answered "uncertain" (and why), with the accuracy on the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training import config, pipeline, splits
from training.cropsets import load_crops
from training.metrics import format_report, plot_confusion


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=config.SHIPPED_MODEL, help="the .h5 (its metadata JSON beside it)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="a folder with one sub-folder per class")
    source.add_argument("--data-root", type=Path, help="the folder holding the labs (with --lab and --split)")
    p.add_argument("--lab", choices=config.LABS)
    p.add_argument("--split", choices=["train", "validation", "test"], default="test")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--plot", type=Path, help="write the confusion matrix to this PNG")
    p.add_argument("--update-metadata", metavar="NAME", help="also store the figures in the model's metadata")
    args = p.parse_args(argv)
    if args.data_root and not args.lab:
        p.error("--data-root needs --lab")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from hematovision.classifier import ModelLoadError, load_classifier, metadata_path_for

    try:
        classifier = load_classifier(args.model)
        if args.data_dir:
            rows = splits.folder_rows(args.data_dir, classifier.labels, include_unknown=True)
            name = args.data_dir.name
        else:
            kwargs = {"include_unknown": True} if args.lab == "lisc" else {}
            rows = splits.lab_rows(args.lab, args.data_root, classifier.labels, args.split, **kwargs)
            name = f"{args.lab} {args.split}"
        if not len(rows):
            raise splits.DataError(f"no images of the classes {classifier.labels} found")
    except (ModelLoadError, splits.DataError) as exc:
        print(f"evaluate.py: {exc}", file=sys.stderr)
        return 2
    result = pipeline.assess_crops(classifier, load_crops(rows), unknown_type=True, sources=args.lab == "kaggle")
    result.update({"data": name, "model": args.model.name})
    print(format_report(result))
    if args.json:
        config.write_json(args.json, result)
    if args.plot:
        plot_confusion(result, args.plot, f"{name}: accuracy {result['accuracy']:.3f} (n={result['n']})")
    if args.update_metadata:
        meta_path = metadata_path_for(args.model)
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        metadata.setdefault("evaluation", {})[args.update_metadata] = {
            k: v for k, v in result.items() if k not in ("model", "per_source")}
        meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
