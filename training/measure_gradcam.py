"""How often does the Grad-CAM heatmap point at the white cell? A check of what the model looks at.

    python training/measure_gradcam.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TEST_SIMPLE \
        --json model/gradcam_kaggle_test_simple.json [--model path/to/new.h5] [--overlays /tmp/gradcam]

For each image the app's prediction is made (test-time views, as the app does), the Grad-CAM heatmap of that
class is stretched over the image, and its peak (the centre of the hottest heatmap cell, see
hematovision.gradcam.find_peak) is compared with the white cell, defined two ways:

1. By colour (any folder of images): the stained nucleus is purple (blue clearly above red and green, and not
   bright); the cell is the largest such blob, holes filled and dilated by a few pixels. Images with no purple
   blob are listed and left out. This is the nucleus, not the whole cell, and it is a guess.
2. By annotation (TEST_SIMPLE): the white cell's bounding box drawn by the BCCD annotators.
   test_simple_to_original.csv (found above --data-dir, or --kaggle-dir) maps each image to its original photo,
   and --wbc-boxes gives that photo's WBC box(es) in the original's pixels: a CSV original_id,xmin,ymin,xmax,ymax
   (default training/splits/bccd_wbc_boxes.csv) or a folder of VOC .xml annotations with WBC objects.
   Each TEST_SIMPLE image is its 640x480 original halved on both axes (no crop, flip or shift; only brightness
   and contrast differ), and the script checks that for every image: the original, resized to the image's size,
   must match it (mean squared difference of the per-channel standardised images below --max-misfit), otherwise
   the image is reported and left out. Boxes are then scaled by image size / original size.
   The Kaggle copy of the BCCD annotations (dataset-master/Annotations) holds RBC boxes only, so the WBC boxes
   (372 boxes on 358 photos) were taken from the BCCD repository's annotation export (Shenggan/BCCD_Dataset,
   test.csv, MIT licence; its RBC boxes match the Kaggle copy's for ids 50 and above and are re-drawn versions
   of the same cells below). On every one of the 358 photos the centre of the largest purple blob lies in a box.

--held-out-originals measures on the photos the model never trained on outside TEST: the original photos of the
Kaggle TRAIN source photos that the model's training held out for validation, halved as TEST_SIMPLE's were. That
is where a heatmap setting (--shifts, --method) is chosen; TEST_SIMPLE only reports. --trained-on-originals does the
same for the other Kaggle TRAIN source photos: the model trained on crops of them, so they are a weaker check, but
there are 233 boxed ones against 41. Several --shifts or --method values measure each setting.

Prints for each definition the hit rate with a 95% Wilson interval, the rate a randomly placed point would
reach, and per class; for the annotated boxes also how far the missed peaks are from the box (within one
heatmap cell, i.e. 1/7 of the image, or further) and whether the hottest cell is on the heatmap's edge.
--json writes all of it, per image too; --overlays DIR writes each image with its heatmap, box and peak as PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy import ndimage

from hematovision.gradcam import DEFAULT_METHOD, DEFAULT_SHIFTS, METHODS
from hematovision.imaging import decode_image, to_model_input
from training.metrics import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "model" / "blood_cell_model.h5"
DEFAULT_BOXES = ROOT / "training" / "splits" / "bccd_wbc_boxes.csv"
SOURCE_MAP = "test_simple_to_original.csv"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder per class (or any folder) of images")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"Keras .h5 model (default {DEFAULT_MODEL})")
    p.add_argument("--margin", type=int, default=4, help="pixels the cell blob is dilated by (default 4)")
    p.add_argument("--min-blue-excess", type=int, default=20, help="blue must beat red and green by this (20)")
    p.add_argument("--max-brightness", type=int, default=200, help="mean of R, G, B must be under this (200)")
    p.add_argument("--kaggle-dir", type=Path,
                   help=f"folder with {SOURCE_MAP} and dataset-master/JPEGImages (default: found above --data-dir)")
    p.add_argument("--wbc-boxes", type=Path, default=DEFAULT_BOXES,
                   help="CSV original_id,xmin,ymin,xmax,ymax or a folder of VOC .xml files with WBC objects")
    p.add_argument("--max-misfit", type=float, default=0.2,
                   help="largest standardised mean squared difference between an image and its resized original "
                        "(0.2; TEST_SIMPLE's are 0.015-0.07)")
    originals = p.add_mutually_exclusive_group()
    originals.add_argument("--held-out-originals", action="store_const", const="held-out", dest="originals",
                           help="instead of --data-dir's images, measure on the original photos of the Kaggle TRAIN "
                                "source photos that the model's training held out for validation (--data-dir = "
                                "TRAIN), halved like TEST_SIMPLE: the set to choose settings on, never TEST_SIMPLE")
    originals.add_argument("--trained-on-originals", action="store_const", const="trained-on", dest="originals",
                           help="the same for the other Kaggle TRAIN source photos, whose crops the model trained on")
    p.add_argument("--shifts", type=int, nargs="+", default=[DEFAULT_SHIFTS],
                   help=f"heatmap refinement: k x k shifted copies (hematovision.gradcam; the app uses "
                        f"{DEFAULT_SHIFTS}); several values measure each")
    p.add_argument("--method", nargs="+", choices=METHODS, default=[DEFAULT_METHOD],
                   help=f"channel weighting (hematovision.gradcam; the app uses {DEFAULT_METHOD}); "
                        "several values measure each")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--overlays", type=Path, help="write each image with heatmap, WBC box and peak to this folder")
    return p.parse_args(argv)


def find_cell_mask(
    rgb: np.ndarray, *, margin: int = 4, min_blue_excess: int = 20, max_brightness: int = 200
) -> np.ndarray | None:
    """(H, W, 3) uint8 -> boolean mask of the largest purple-stained blob, filled and dilated; None if none."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    purple = (b > r + min_blue_excess) & (b > g + min_blue_excess) & (rgb.mean(axis=-1) < max_brightness)
    labelled, count = ndimage.label(purple)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(purple, labelled, index=range(1, count + 1))
    blob = labelled == (int(np.argmax(sizes)) + 1)
    blob = ndimage.binary_fill_holes(blob)
    if margin > 0:
        blob = ndimage.binary_dilation(blob, iterations=margin)
    return blob


def list_files(root: Path) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def find_kaggle_dir(data_dir: Path) -> Path | None:
    """The folder above `data_dir` that holds test_simple_to_original.csv (blood-cells/), or None."""
    for folder in [data_dir, *data_dir.resolve().parents][:5]:
        if (folder / SOURCE_MAP).is_file():
            return folder
    return None


def read_source_map(kaggle_dir: Path) -> dict[Path, int]:
    """Resolved path of each TEST_SIMPLE image -> the id of the original BCCD photo it was made from."""
    with open(kaggle_dir / SOURCE_MAP, newline="", encoding="utf-8") as fh:
        return {(kaggle_dir / "dataset2-master" / row["test_simple_file"]).resolve(): int(row["original_image_id"])
                for row in csv.DictReader(fh)}


def read_wbc_boxes(path: Path) -> dict[int, list[tuple[float, float, float, float]]]:
    """Original id -> WBC boxes (x0, y0, x1, y1) in the original's pixel edges, from a CSV or VOC .xml files.
    VOC coordinates are 1-based and inclusive, so a box spans xmin - 1 .. xmax."""
    boxes: dict[int, list[tuple[float, float, float, float]]] = {}
    if path.is_dir():
        for xml_path in sorted(path.glob("*.xml")):
            digits = "".join(ch for ch in xml_path.stem if ch.isdigit())
            for obj in ET.parse(xml_path).getroot().iter("object"):
                box = obj.find("bndbox")
                if (obj.findtext("name") or "").strip().upper() == "WBC" and box is not None and digits:
                    xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                    boxes.setdefault(int(digits), []).append((xmin - 1, ymin - 1, xmax, ymax))
        return boxes
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            xmin, ymin, xmax, ymax = (float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.setdefault(int(row["original_id"]), []).append((xmin - 1, ymin - 1, xmax, ymax))
    return boxes


def misfit(rgb: np.ndarray, original_path: Path) -> tuple[float, tuple[float, float]]:
    """How well the image is its original resized (standardised mean squared difference, 0 = same picture up to
    brightness and contrast), and the scale (x, y) from the original's pixels to the image's."""
    from PIL import Image

    original = Image.open(original_path).convert("RGB")
    height, width = rgb.shape[:2]
    resized = np.asarray(original.resize((width, height), Image.Resampling.BOX), dtype=np.float64)

    def standardise(a):
        return (a - a.mean(axis=(0, 1))) / (a.std(axis=(0, 1)) + 1e-6)

    score = float(np.mean((standardise(rgb.astype(np.float64)) - standardise(resized)) ** 2))
    return score, (width / original.width, height / original.height)


def distance_to_boxes(x: int, y: int, boxes) -> float:
    """Pixels from the centre of pixel (x, y) to the nearest box (0 inside one)."""
    px, py = x + 0.5, y + 0.5
    return min(math.hypot(max(x0 - px, 0, px - x1), max(y0 - py, 0, py - y1)) for x0, y0, x1, y1 in boxes)


def rate(rows: list[dict], key: str) -> dict:
    """Hits, rate, Wilson interval and per-folder rates of the rows that have `key` (True/False)."""
    scored = [r for r in rows if r.get(key) is not None]
    hits = sum(bool(r[key]) for r in scored)
    n = len(scored)
    low, high = wilson_interval(hits, n)
    groups: dict[str, list[bool]] = {}
    for r in scored:
        groups.setdefault(r["folder"], []).append(bool(r[key]))
    return {
        "n": n,
        "hits": hits,
        "hit_rate": hits / n if n else 0.0,
        "hit_rate_ci95": [low, high],
        "per_folder": {
            k: {"n": len(v), "hits": sum(v), "hit_rate": sum(v) / len(v)} for k, v in sorted(groups.items())
        },
    }


def write_overlay(folder: Path, relative: str, image, heatmap, peak, boxes, hit) -> None:
    from PIL import ImageDraw

    from hematovision.gradcam import overlay_heatmap

    overlay = overlay_heatmap(image, heatmap)
    draw = ImageDraw.Draw(overlay)
    for x0, y0, x1, y1 in boxes or []:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 200, 0), width=2)
    x, y = peak
    draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(255, 255, 255), width=2)
    tag = "hit" if hit else ("miss" if hit is not None else "nobox")
    folder.mkdir(parents=True, exist_ok=True)
    overlay.save(folder / f"{tag}_{relative.replace('/', '_').rsplit('.', 1)[0]}.png")


def kaggle_train_originals(
    train_dir: Path, kaggle_dir: Path, metadata: dict, *, held_out: bool = True
) -> list[tuple[str, str, int]]:
    """(name, class, original id) of the Kaggle TRAIN source photos that the model's training held out for
    validation (held_out=True), or of the others, whose crops it trained on (held_out=False): the same grouped
    split of Kaggle TRAIN as train.py (fit_abstention.kaggle_split, with the model's own fraction and seed), mapped
    to the original photos by training/splits/kaggle_train_sources.csv. None of them is a TEST or TEST_SIMPLE photo
    (training/splits/kaggle_test_sources.csv shares no id with it)."""
    from training.evaluate import read_source_ids
    from training.fit_abstention import kaggle_split, split_settings
    from training.train import DEFAULTS as TRAIN_DEFAULTS

    fraction, seed = split_settings(metadata)
    train, validation = kaggle_split(train_dir, metadata["labels"], TRAIN_DEFAULTS["sources"], fraction, seed)
    part = validation if held_out else train
    source_of = read_source_ids(TRAIN_DEFAULTS["sources"])
    chosen = {}
    for path, target in zip(part.paths, part.targets, strict=True):
        source = source_of.get(part.relative(path))
        if source:
            chosen[int(source)] = metadata["labels"][target]
    jpegs = kaggle_dir / "dataset-master" / "JPEGImages"
    return [(f"{label}/BloodImage_{source:05d}.jpg", label, source) for source, label in sorted(chosen.items())
            if (jpegs / f"BloodImage_{source:05d}.jpg").is_file()]


def measure(
    data_dir: Path,
    model_path: Path,
    *,
    margin: int,
    min_blue_excess: int,
    max_brightness: int,
    kaggle_dir: Path | None = None,
    wbc_boxes: Path = DEFAULT_BOXES,
    max_misfit: float = 0.2,
    overlays: Path | None = None,
    shifts: int = DEFAULT_SHIFTS,
    method: str = DEFAULT_METHOD,
    originals_of: str | None = None,
) -> dict:
    """The figures of one heatmap setting. originals_of: None (the files under data_dir), "held-out" or
    "trained-on" (Kaggle TRAIN's source photos, see kaggle_train_originals; data_dir is then TRAIN)."""
    from PIL import Image

    from hematovision.classifier import load_classifier
    from hematovision.gradcam import GradCam, find_peak

    classifier = load_classifier(model_path, runtime="tf.function")  # the app's prediction, without converting
    labels = classifier.labels
    explainer = GradCam(classifier.model)
    kaggle_dir = kaggle_dir or find_kaggle_dir(data_dir)
    originals = (kaggle_dir / "dataset-master" / "JPEGImages") if kaggle_dir else None

    # (relative name, folder, loader, original id or None, check that the image is its original halved)
    items: list[tuple[str, str, object, int | None, bool]] = []
    if originals_of:
        if not kaggle_dir:
            raise SystemExit(f"--{originals_of}-originals needs --kaggle-dir (the folder with dataset-master/)")

        def halved(path):  # TEST_SIMPLE's images are their originals halved: make these the same way
            return lambda: Image.open(path).convert("RGB").reduce(2)

        for name, label, source in kaggle_train_originals(data_dir, kaggle_dir, classifier.metadata,
                                                          held_out=originals_of == "held-out"):
            items.append((name, label, halved(originals / f"BloodImage_{source:05d}.jpg"), source, False))
    else:
        sources = read_source_map(kaggle_dir) if kaggle_dir else {}
        for path in list_files(data_dir):
            folder = path.parent.name.upper() if path.parent != data_dir else "(top level)"
            items.append((path.relative_to(data_dir).as_posix(), folder,
                          lambda path=path: decode_image(path.read_bytes()), sources.get(path.resolve()), True))
    if not items:
        raise SystemExit(f"No images under {data_dir}")
    has_sources = any(source is not None for _name, _folder, _load, source, _check in items)
    if has_sources and not wbc_boxes.exists():
        raise SystemExit(f"WBC boxes not found: {wbc_boxes}")
    boxes_by_source = read_wbc_boxes(wbc_boxes) if has_sources else {}

    rows: list[dict] = []
    no_cell: list[str] = []
    misfits: list[str] = []
    areas: list[float] = []  # the blob's share of the image: the hit rate of a peak placed at random
    box_areas: list[float] = []
    grid = explainer.grid
    for relative, folder, load, source, check_misfit in items:
        image = load()
        rgb = np.asarray(image)
        model_input = to_model_input(image)
        probabilities = classifier.predict(model_input[None])[0]
        class_index = int(np.argmax(probabilities))
        heatmap = explainer.compute_heatmap(model_input, class_index, shifts=shifts, method=method)
        x, y = find_peak(heatmap, image.size)
        # Which of the block's cells the peak lies in (the heatmap may be finer than the block).
        cell_row = min(int(y * grid[0] / image.size[1]), grid[0] - 1)
        cell_col = min(int(x * grid[1] / image.size[0]), grid[1] - 1)
        on_edge = cell_row in (0, grid[0] - 1) or cell_col in (0, grid[1] - 1)
        row = {
            "file": relative,
            "folder": folder,
            "predicted": labels[class_index],
            "probability": round(float(probabilities[class_index]), 4),
            "peak": [x, y],
            "peak_on_heatmap_edge": bool(on_edge),
            "hit_colour": None,
            "hit_box": None,
        }
        mask = find_cell_mask(rgb, margin=margin, min_blue_excess=min_blue_excess, max_brightness=max_brightness)
        if mask is None:
            no_cell.append(relative)
        else:
            areas.append(float(mask.mean()))
            row["hit_colour"] = bool(mask[y, x])

        scaled = None
        original = originals / f"BloodImage_{source:05d}.jpg" if source is not None else None
        if source is not None and source in boxes_by_source and original.is_file():
            score, (sx, sy) = misfit(rgb, original)
            row["source_id"], row["misfit"] = source, round(score, 4)
            if score <= max_misfit or not check_misfit:
                scaled = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes_by_source[source]]
                distance = distance_to_boxes(x, y, scaled)
                cell = max(image.size[0] / grid[1], image.size[1] / grid[0])
                row.update(hit_box=distance == 0, box_distance_px=round(distance, 1),
                           box_distance_cells=round(distance / cell, 2), wbc_boxes=len(scaled))
                inside = np.zeros(rgb.shape[:2], bool)
                for x0, y0, x1, y1 in scaled:
                    inside[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] = True
                box_areas.append(float(inside.mean()))
            else:
                misfits.append(relative)
        if overlays:
            write_overlay(overlays, relative, image, heatmap, (x, y), scaled, row["hit_box"])
        rows.append(row)

    colour = rate(rows, "hit_colour")
    result = {
        "data_dir": str(data_dir),
        "images_measured": {None: "the files under data_dir", "held-out": "held-out validation originals, halved",
                            "trained-on": "trained-on Kaggle TRAIN originals, halved"}[originals_of],
        "model": str(model_path),
        "shifts": shifts,
        "method": method,
        "target_layer": explainer.layer.name,
        "labels": labels,
        "prediction": f"the app's: mean over {int(classifier.metadata.get('test_time_views', 1))} test-time views",
        "peak": "centre of the hottest heatmap cell" if shifts == 1 else
                f"hottest pixel of the heatmap averaged over {shifts}x{shifts} shifted copies",
        # The colour definition, as before: the largest purple blob, dilated.
        **colour,
        "chance_rate": float(np.mean(areas)) if areas else 0.0,
        "no_cell_found": no_cell,
        "settings": {"margin": margin, "min_blue_excess": min_blue_excess, "max_brightness": max_brightness,
                     "max_misfit": max_misfit, "wbc_boxes": str(wbc_boxes), "kaggle_dir": str(kaggle_dir)},
    }
    boxed = [r for r in rows if r["hit_box"] is not None]
    if boxed:
        missed = [r for r in boxed if not r["hit_box"]]
        result["annotated_box"] = {
            **rate(rows, "hit_box"),
            "chance_rate": float(np.mean(box_areas)),
            "misfit_left_out": misfits,
            "without_box": sum(1 for r in rows if r["hit_box"] is None) - len(misfits),
            "misses": {
                "n": len(missed),
                "within_one_heatmap_cell": sum(r["box_distance_cells"] <= 1 for r in missed),
                "further": sum(r["box_distance_cells"] > 1 for r in missed),
                "hottest_cell_on_heatmap_edge": sum(r["peak_on_heatmap_edge"] for r in missed),
                "median_distance_px": float(np.median([r["box_distance_px"] for r in missed])) if missed else 0.0,
            },
            "hits_with_hottest_cell_on_heatmap_edge": sum(r["peak_on_heatmap_edge"] for r in boxed if r["hit_box"]),
        }
    result["images"] = rows
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = [(method, shifts) for method in args.method for shifts in args.shifts]
    results = {}
    for method, shifts in settings:
        name = f"{method}, {shifts}x{shifts}"
        result = results[name] = measure(
            args.data_dir,
            args.model,
            margin=args.margin,
            min_blue_excess=args.min_blue_excess,
            max_brightness=args.max_brightness,
            kaggle_dir=args.kaggle_dir,
            wbc_boxes=args.wbc_boxes,
            max_misfit=args.max_misfit,
            overlays=(args.overlays / f"{method}_shifts{shifts}".replace("+", "p")
                      if args.overlays and len(settings) > 1 else args.overlays),
            shifts=shifts,
            method=method,
            originals_of=args.originals,
        )
        print(f"== {method}, {shifts}x{shifts} shifted copies; layer {result['target_layer']}; prediction: "
              f"{result['prediction']}; images: {result['images_measured']}")
        report(result)
    # One setting: its figures; several: each under "method, kxk".
    output = results[name] if len(settings) == 1 else {"by_setting": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
    return output


def report(result: dict) -> None:
    print_rate("Grad-CAM peak on the stained cell (largest purple blob)", result)
    if result["no_cell_found"]:
        print(f"  no purple blob found in {len(result['no_cell_found'])} images (left out)")
    box = result.get("annotated_box")
    if box:
        print_rate("Grad-CAM peak in the annotated WBC box (BCCD)", box)
        misses = box["misses"]
        print(f"  misses: {misses['within_one_heatmap_cell']} within one heatmap cell of the box, "
              f"{misses['further']} further (median {misses['median_distance_px']:.0f} px); hottest cell on the "
              f"heatmap's edge in {misses['hottest_cell_on_heatmap_edge']} misses and "
              f"{box['hits_with_hottest_cell_on_heatmap_edge']} hits")
        if box["misfit_left_out"]:
            print(f"  left out, image does not match its original: {', '.join(box['misfit_left_out'])}")
        if box["without_box"]:
            print(f"  {box['without_box']} images have no annotated box (no known original photo, or no WBC box on it)")


def print_rate(title: str, figures: dict) -> None:
    low, high = figures["hit_rate_ci95"]
    print(f"{title}: {figures['hits']}/{figures['n']} = {figures['hit_rate']:.1%} (95% CI {low:.1%}-{high:.1%}); "
          f"a random point would hit {figures['chance_rate']:.1%}")
    for group, row in figures["per_folder"].items():
        print(f"  {group:<12} {row['hits']:>4}/{row['n']:<4} {row['hit_rate']:.1%}")


if __name__ == "__main__":
    main()
