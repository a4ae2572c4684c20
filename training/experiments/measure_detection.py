"""Measure hematovision.cells (white-cell detector) on three labs and write training/experiments/results/detection.json.

Run from the repository root (about 3 minutes on 2 CPU cores):

    .venv/bin/python training/experiments/measure_detection.py

(hematovision is installed editable in .venv; without that install, prefix the command with PYTHONPATH=.)

Options: --data (default ../shared/data, i.e. /work/shared/data), --every N (every Nth image only, for quick looks;
the committed JSON is from --every 1), --sheets DIR (also write contact sheets of boxed BCCD fields and canonical
crops from every lab to DIR, e.g. /tmp), --out (the JSON path; '-' prints only), --second-look
(hematovision.cells.SECOND_LOOK on, measured and not adopted: results/detection_second_look.json).

What is measured:
1. BCCD originals (dataset-master/JPEGImages, 640x480) against training/splits/bccd_wbc_boxes.csv (the Kaggle VOC
   XMLs hold RBC boxes only). A detection is a true positive when its box centre lies inside a true WBC box, each true
   box matched once. Recall, precision, per-image failures; dev half = even ids (tuned on), held half = odd ids.
   The 8 photos without WBC boxes in the CSV are not scored; their detection counts are listed.
2. Single-cell sets. PBC (pbc_split.csv; train+validation tuned on, test reported apart): exactly one cell found and
   the primary cell's box centre in the central 40% (|dx| <= 0.2 W, |dy| <= 0.2 H). LISC crops (not centred): >= 1
   and exactly 1 found. Kaggle TRAIN (rotated/shifted copies, a few with 2 WBCs): >= 1 found; TEST and TEST_SIMPLE
   reported the same way, never tuned on.
3. Timing: median ms of find_white_cells per decoded 640x480 BCCD field (single thread, after a warm-up).
4. Cell diameter against the annotation: matched BCCD detections' box diameter / true box diameter.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hematovision.cells import CROP_SCALE, canonical_crop, find_white_cells, primary_index

ROOT = Path(__file__).resolve().parents[2]
BOXES = ROOT / "training" / "splits" / "bccd_wbc_boxes.csv"
PBC_SPLIT = ROOT / "training" / "splits" / "pbc_split.csv"
OUT = ROOT / "training" / "experiments" / "results" / "detection.json"
CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def match(cells, truths):
    """(true positives, false positives, missed true boxes) with centre-in-box matching, each truth used once."""
    unused = list(truths)
    tp = fp = 0
    for cell in sorted(cells, key=lambda c: -c.nucleus_area):
        cx, cy = cell.centre
        hit = next((t for t in unused if t[0] <= cx <= t[2] and t[1] <= cy <= t[3]), None)
        if hit is None:
            fp += 1
        else:
            unused.remove(hit)
            tp += 1
    return tp, fp, unused


def bccd(data: Path, every: int, sheet_dir: Path | None) -> dict:
    truths = defaultdict(list)
    with BOXES.open() as f:
        for row in csv.DictReader(f):
            truths[int(row["original_id"])].append(tuple(int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
    folder = data / "blood-cells" / "dataset-master" / "JPEGImages"
    paths = sorted(folder.glob("BloodImage_*.jpg"))[::every]
    halves = {"dev_even_ids": [0, 0, 0], "held_odd_ids": [0, 0, 0]}  # tp, fp, fn
    failures, unscored, times, ratios, fields = [], {}, [], [], []
    find_white_cells(load(paths[0]))  # warm-up
    for path in paths:
        image_id = int(path.stem.split("_")[1])
        rgb = load(path)
        start = time.perf_counter()
        cells = find_white_cells(rgb)
        times.append((time.perf_counter() - start) * 1000)
        if image_id not in truths:
            unscored[image_id] = len(cells)
            continue
        tp, fp, missed = match(cells, truths[image_id])
        half = halves["dev_even_ids" if image_id % 2 == 0 else "held_odd_ids"]
        half[0] += tp
        half[1] += fp
        half[2] += len(missed)
        for cell in cells:
            cx, cy = cell.centre
            for t in truths[image_id]:
                if t[0] <= cx <= t[2] and t[1] <= cy <= t[3]:
                    ratios.append(cell.diameter / max(t[2] - t[0], t[3] - t[1]))
                    break
        if fp or missed:
            failures.append({"id": image_id, "true": len(truths[image_id]), "found": len(cells), "false_pos": fp,
                             "missed": len(missed)})
        if sheet_dir is not None and (fp or missed or len(fields) < 12):
            fields.append((rgb, cells, truths[image_id], image_id))
    result = {}
    for name, (tp, fp, fn) in halves.items():
        result[name] = {"true_boxes": tp + fn, "detections": tp + fp, "recall": round(tp / max(1, tp + fn), 4),
                        "precision": round(tp / max(1, tp + fp), 4)}
    tp, fp, fn = (a + b for a, b in zip(*halves.values(), strict=True))
    result["all"] = {"true_boxes": tp + fn, "detections": tp + fp, "recall": round(tp / max(1, tp + fn), 4),
                     "precision": round(tp / max(1, tp + fp), 4)}
    result["failures"] = failures
    result["unscored_photos_detections"] = unscored
    result["ms_per_640x480_field_median"] = round(statistics.median(times), 2)
    result["ms_per_640x480_field_p95"] = round(float(np.percentile(times, 95)), 2)
    result["diameter_over_true_box"] = {"median": round(statistics.median(ratios), 3),
                                        "p10": round(float(np.percentile(ratios, 10)), 3),
                                        "p90": round(float(np.percentile(ratios, 90)), 3)}
    if sheet_dir is not None:
        field_sheet(fields[:40], sheet_dir / "detection_bccd_fields.png")
    return result


def field_sheet(fields, path: Path) -> None:
    tiles = []
    for rgb, cells, truths, image_id in fields:
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        for t in truths:
            draw.rectangle(t, outline=(0, 200, 0), width=3)
        for c in cells:
            draw.rectangle(c.box, outline=(0, 0, 0), width=3)
        draw.text((5, 5), str(image_id), fill=(0, 0, 0))
        tiles.append(image.resize((320, 240)))
    sheet = Image.new("RGB", (320 * 5, 240 * ((len(tiles) + 4) // 5)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (320 * (i % 5), 240 * (i // 5)))
    sheet.save(path)


def single_cell(paths, centred: bool) -> tuple[dict, list]:
    found = one = central = 0
    crops, misses = [], []
    for path in paths:
        rgb = load(path)
        cells = find_white_cells(rgb)
        found += bool(cells)
        one += len(cells) == 1
        if cells:
            primary = cells[primary_index(cells, rgb.shape)]
            cx, cy = primary.centre
            h, w = rgb.shape[:2]
            ok = len(cells) == 1 and abs(cx - w / 2) <= 0.2 * w and abs(cy - h / 2) <= 0.2 * h
            central += ok
            if len(crops) < 8:
                crops.append(canonical_crop(rgb, primary, 112))
        if (centred and not (cells and ok)) or not cells:
            misses.append(f"{path.parent.name}/{path.name}:{len(cells)}")
    n = max(1, len(paths))
    result = {"images": len(paths), "found_at_least_one": round(found / n, 4), "exactly_one": round(one / n, 4)}
    if centred:
        result["exactly_one_and_central"] = round(central / n, 4)
    result["misses_first_20"] = misses[:20]
    result["misses"] = len(misses)
    return result, crops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--sheets", type=Path, default=None)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--only", default="bccd,pbc,lisc,kaggle")
    p.add_argument("--second-look", action="store_true",
                   help="with hematovision.cells.SECOND_LOOK on (measured, not adopted: docs/training.md)")
    args = p.parse_args()
    only = set(args.only.split(","))
    results: dict = {"crop_scale": CROP_SCALE, "every": args.every}
    if args.second_look:
        import hematovision.cells

        hematovision.cells.SECOND_LOOK = True
        results["second_look"] = True
    sheet_rows = {}
    if "bccd" in only:
        results["bccd"] = bccd(args.data, args.every, args.sheets)
        print(json.dumps({k: v for k, v in results["bccd"].items() if k != "failures"}, indent=1))
    if "pbc" in only:
        splits = defaultdict(list)
        with PBC_SPLIT.open() as f:
            for row in csv.DictReader(f):
                splits["test" if row["split"] == "test" else "train_validation"].append(row["path"])
        results["pbc"] = {}
        for name, rows in splits.items():
            paths = [args.data / "pbc-4class" / r for r in sorted(rows)[:: args.every]]
            results["pbc"][name], sheet_rows[f"pbc_{name}"] = single_cell(paths, centred=True)
            print("pbc", name, {k: v for k, v in results["pbc"][name].items() if k != "misses_first_20"})
    if "lisc" in only:
        paths = sorted((args.data / "lisc-crops").glob("*/*.jpg"))[:: args.every]
        results["lisc"], sheet_rows["lisc"] = single_cell(paths, centred=False)
        print("lisc", {k: v for k, v in results["lisc"].items() if k != "misses_first_20"})
    if "kaggle" in only:
        results["kaggle"] = {}
        for split in ("TRAIN", "TEST", "TEST_SIMPLE"):
            folder = args.data / "blood-cells" / "dataset2-master" / "images" / split
            paths = sorted(q for c in CLASSES for q in (folder / c).glob("*.jpeg"))[:: args.every]
            results["kaggle"][split], sheet_rows[f"kaggle_{split}"] = single_cell(paths, centred=False)
            print("kaggle", split, {k: v for k, v in results["kaggle"][split].items() if k != "misses_first_20"})
    if args.sheets is not None and sheet_rows:
        sheet = Image.new("RGB", (112 * 8, 112 * len(sheet_rows)), "white")
        for r, crops in enumerate(sheet_rows.values()):
            for c, crop in enumerate(crops):
                sheet.paste(Image.fromarray(crop), (112 * c, 112 * r))
        sheet.save(args.sheets / "detection_crops.png")
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
