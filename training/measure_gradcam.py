"""How often does the Grad-CAM heatmap point at the white cell? A rough, label-free check of what the model looks at.

    python training/measure_gradcam.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TEST_SIMPLE

For each image: the white cell is found by colour (the stained nucleus is purple: blue clearly above red and green,
and not bright), as the largest such blob, holes filled and dilated by a few pixels to take in the rim of the
cell; the heatmap of the predicted class is stretched over the image; the image is a *hit* when the heatmap's
hottest pixel falls inside that blob. Prints the hit rate overall and per class; --json writes it.
Images with no purple blob at all are listed and left out of the rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hematovision.imaging import decode_image, to_model_input  # noqa: E402

DEFAULT_MODEL = ROOT / "model" / "blood_cell_model.h5"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder per class (or any folder) of images")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"Keras .h5 model (default {DEFAULT_MODEL})")
    p.add_argument("--margin", type=int, default=4, help="pixels the cell blob is dilated by (default 4)")
    p.add_argument("--min-blue-excess", type=int, default=20, help="blue must beat red and green by this (20)")
    p.add_argument("--max-brightness", type=int, default=200, help="mean of R, G, B must be under this (200)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
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


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def list_files(root: Path) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def measure(data_dir: Path, model_path: Path, *, margin: int, min_blue_excess: int, max_brightness: int) -> dict:
    import keras

    from hematovision.classifier import metadata_path_for
    from hematovision.gradcam import GradCam, find_peak

    labels = json.loads(metadata_path_for(model_path).read_text(encoding="utf-8"))["labels"]
    model = keras.models.load_model(model_path, compile=False)
    explainer = GradCam(model)
    files = list_files(data_dir)
    if not files:
        raise SystemExit(f"No images under {data_dir}")

    per_group: dict[str, list[int]] = {}
    no_cell: list[str] = []
    areas: list[float] = []  # the blob's share of the image: the hit rate of a peak placed at random
    for path in files:
        image = decode_image(path.read_bytes())
        rgb = np.asarray(image)
        mask = find_cell_mask(rgb, margin=margin, min_blue_excess=min_blue_excess, max_brightness=max_brightness)
        relative = path.relative_to(data_dir).as_posix()
        if mask is None:
            no_cell.append(relative)
            continue
        areas.append(float(mask.mean()))
        model_input = to_model_input(image)
        class_index = int(np.argmax(model.predict_on_batch(model_input[None].astype(np.float32))[0]))
        x, y = find_peak(explainer.compute_heatmap(model_input, class_index), image.size)
        group = path.parent.name.upper() if path.parent != data_dir else "(top level)"
        per_group.setdefault(group, []).append(int(mask[y, x]))

    hits = sum(sum(v) for v in per_group.values())
    n = sum(len(v) for v in per_group.values())
    low, high = wilson_interval(hits, n)
    return {
        "data_dir": str(data_dir),
        "model": str(model_path),
        "target_layer": explainer.layer.name,
        "labels": labels,
        "n": n,
        "hits": hits,
        "hit_rate": hits / n if n else 0.0,
        "hit_rate_ci95": [low, high],
        "chance_rate": float(np.mean(areas)) if areas else 0.0,
        "per_folder": {
            k: {"n": len(v), "hits": sum(v), "hit_rate": sum(v) / len(v)} for k, v in sorted(per_group.items())
        },
        "no_cell_found": no_cell,
        "settings": {"margin": margin, "min_blue_excess": min_blue_excess, "max_brightness": max_brightness},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = measure(
        args.data_dir,
        args.model,
        margin=args.margin,
        min_blue_excess=args.min_blue_excess,
        max_brightness=args.max_brightness,
    )
    low, high = result["hit_rate_ci95"]
    print(
        f"Grad-CAM peak on the stained cell: {result['hits']}/{result['n']} = {result['hit_rate']:.1%} "
        f"(95% CI {low:.1%}-{high:.1%}); a random point would hit {result['chance_rate']:.1%}; "
        f"layer {result['target_layer']}"
    )
    for group, row in result["per_folder"].items():
        print(f"  {group:<12} {row['hits']:>4}/{row['n']:<4} {row['hit_rate']:.1%}")
    if result["no_cell_found"]:
        print(f"  no purple blob found in {len(result['no_cell_found'])} images (left out)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
