"""Build, deterministically, a set of images that are NOT white-cell images, to measure the abstention rule.

    python training/experiments/make_noncell_set.py --bccd-dir ../shared/data/blood-cells/dataset-master \
        --out /tmp/hv_noncell

Writes a few hundred images into --out (outside git; the folder is emptied first), one folder per kind, and
`manifest.csv` (path,kind,source). The same command gives the same files on any machine with the pinned
scikit-image and Pillow. Kinds:

- natural: photographs and scans shipped with scikit-image (skimage.data: astronaut, coffee, rocket, moon, a
  retina, an immunohistochemistry slide, a page of text, ...), whole and as random crops;
- red_cells: crops of the BCCD smear photos (dataset-master/JPEGImages) that contain red cells and platelets but
  no white cell: no part of any annotated WBC box (VOC XML in Annotations/), and no large purple-stained blob
  (an unannotated white cell);
- blank: single-colour images (white, black, greys, the smear's pink background, the stain's purple, ...);
- noise: Gaussian, uniform, salt-and-pepper and smooth (low-frequency) noise, grey and colour;
- text: rendered words and lines in Pillow's bundled font, in various sizes and colours;
- ui: screenshot-like synthetic application windows (title bar, menu, side bar, buttons, text, a chart).

Measure with training/experiments/measure_abstention.py --noncell-dir /tmp/hv_noncell.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {"out": Path("/tmp/hv_noncell"), "seed": 20261126}
NATURAL = ["astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins", "colorwheel",
           "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
           "moon", "page", "retina", "rocket", "stereo_motorcycle", "text", "binary_blobs"]
COUNTS = {"natural_crops": 4, "red_cells": 80, "blank": 20, "noise": 40, "text": 30, "ui": 30}
WORDS_TEXT = ("blood cell image report sample microscope result patient analysis normal value range count total "
              "the of and to in is for with on by this that from file edit view help settings upload predict class "
              "accuracy model data table chart window status error warning loading please wait next back cancel "
              "ok save open close print export")
WORDS = WORDS_TEXT.split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bccd-dir", required=True, type=Path, help="blood-cells/dataset-master (JPEGImages, Annotations)")
    p.add_argument("--out", type=Path, default=DEFAULTS["out"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    return p.parse_args(argv)


# --- kinds -------------------------------------------------------------------------------------------


def to_rgb_image(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def natural_images(rng: np.random.Generator):
    """skimage.data photos: each whole, then random crops of 25-70% of its side."""
    import skimage.data

    for name in NATURAL:
        array = getattr(skimage.data, name)(**({"rng": 0} if name == "binary_blobs" else {}))  # it is random
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        image = to_rgb_image(array)
        yield f"{name}_whole", image, name
        width, height = image.size
        for i in range(COUNTS["natural_crops"]):
            scale = rng.uniform(0.25, 0.7)
            w, h = max(32, int(width * scale)), max(32, int(height * scale * rng.uniform(0.75, 1.33)))
            w, h = min(w, width), min(h, height)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            yield f"{name}_crop{i}", image.crop((x, y, x + w, y + h)), name


def wbc_boxes(xml_path: Path) -> list[tuple[int, int, int, int]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        if (obj.findtext("name") or "").strip().upper() != "WBC":
            continue
        box = obj.find("bndbox")
        boxes.append(tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def largest_purple_blob(rgb: np.ndarray) -> int:
    """Pixels in the largest stained (purple) blob: a white-cell nucleus is thousands, a platelet a few hundred."""
    from scipy import ndimage

    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    purple = (b > r + 20) & (b > g + 20) & (rgb.mean(axis=-1) < 200)
    labelled, count = ndimage.label(purple)
    if count == 0:
        return 0
    return int(ndimage.sum_labels(purple, labelled, index=range(1, count + 1)).max())


def red_cell_crops(bccd_dir: Path, rng: np.random.Generator, margin: int = 12, max_blob: int = 600):
    """Crops of the smear photos that overlap no annotated white cell (plus `margin`) and hold no purple blob
    larger than a platelet. Crop sizes around the Kaggle images' field of view (320x240 of 640x480)."""
    photos = sorted((bccd_dir / "JPEGImages").glob("*.jpg"))
    order = rng.permutation(len(photos))
    made = 0
    for i in order:
        if made >= COUNTS["red_cells"]:
            return
        photo = photos[i]
        xml = bccd_dir / "Annotations" / (photo.stem + ".xml")
        if not xml.is_file():
            continue
        boxes = wbc_boxes(xml)
        image = Image.open(photo).convert("RGB")
        width, height = image.size
        for _attempt in range(30):
            w = int(rng.choice([200, 240, 280, 320]))
            h = w * 3 // 4
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            clear = all(x + w <= x0 - margin or x >= x1 + margin or y + h <= y0 - margin or y >= y1 + margin
                        for x0, y0, x1, y1 in boxes)
            if not clear:
                continue
            crop = image.crop((x, y, x + w, y + h))
            if largest_purple_blob(np.asarray(crop)) > max_blob:
                continue
            made += 1
            yield f"{photo.stem}_{x}_{y}_{w}", crop, photo.name
            break


def blank_images(rng: np.random.Generator):
    colours = [(255, 255, 255), (0, 0, 0), (128, 128, 128), (64, 64, 64), (200, 200, 200), (255, 0, 0),
               (0, 255, 0), (0, 0, 255), (232, 196, 196), (214, 170, 190), (120, 60, 140), (90, 50, 160),
               (250, 240, 230), (255, 255, 0), (0, 128, 128)]
    colours += [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(COUNTS["blank"] - len(colours))]
    for i, colour in enumerate(colours):
        size = (320, 240) if i % 2 == 0 else (400, 400)
        hex_colour = "".join(f"{c:02x}" for c in colour)
        yield f"blank_{i:02d}_{hex_colour}", Image.new("RGB", size, colour), "uniform colour"


def noise_images(rng: np.random.Generator):
    size = (320, 240)
    for i in range(COUNTS["noise"]):
        kind = ("gaussian", "uniform", "salt_pepper", "smooth")[i % 4]
        colour = (i // 4) % 2 == 0
        shape = (size[1], size[0], 3) if colour else (size[1], size[0], 1)
        if kind == "gaussian":
            array = rng.normal(rng.uniform(60, 200), rng.uniform(15, 70), shape)
        elif kind == "uniform":
            array = rng.uniform(0, 255, shape)
        elif kind == "salt_pepper":
            array = np.full(shape, rng.uniform(80, 200))
            mask = rng.random(shape[:2])
            array[mask < 0.1] = 0
            array[mask > 0.9] = 255
        else:
            small = rng.uniform(0, 255, (int(rng.integers(3, 12)), int(rng.integers(3, 12)), shape[2]))
            array = np.asarray(Image.fromarray(small.astype(np.uint8).squeeze()).resize(size, Image.Resampling.BICUBIC),
                               dtype=np.float64)
        array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array.squeeze(axis=2) if array.ndim == 3 and array.shape[2] == 1 else array)
        yield f"noise_{i:02d}_{kind}_{'colour' if colour else 'grey'}", image.convert("RGB"), kind


def random_words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), n))


def text_images(rng: np.random.Generator):
    for i in range(COUNTS["text"]):
        size = (int(rng.choice([320, 480, 640])), int(rng.choice([240, 360, 480])))
        light = rng.random() < 0.7
        background = tuple(int(c) for c in (rng.integers(215, 256, 3) if light else rng.integers(0, 60, 3)))
        ink = tuple(int(c) for c in (rng.integers(0, 90, 3) if light else rng.integers(180, 256, 3)))
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        font_size = int(rng.choice([12, 16, 22, 32, 48]))
        font = ImageFont.load_default(size=font_size)
        y = int(rng.integers(4, 20))
        while y < size[1] - font_size:
            draw.text((int(rng.integers(4, 30)), y), random_words(rng, int(rng.integers(2, 9))), fill=ink, font=font)
            y += int(font_size * rng.uniform(1.2, 1.8))
        yield f"text_{i:02d}_{font_size}px", image, "rendered text"


def ui_images(rng: np.random.Generator):
    small, normal, title = (ImageFont.load_default(size=s) for s in (11, 14, 18))
    for i in range(COUNTS["ui"]):
        size = (int(rng.choice([480, 640, 800])), int(rng.choice([360, 480, 600])))
        width, height = size
        accent = tuple(int(c) for c in rng.integers(20, 200, 3))
        page = (255, 255, 255) if rng.random() < 0.6 else (245, 246, 248)
        image = Image.new("RGB", size, page)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, width, 28), fill=(225, 225, 228))  # title bar with window buttons
        for k, colour in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
            draw.ellipse((8 + 18 * k, 8, 20 + 18 * k, 20), fill=colour)
        draw.text((80, 6), random_words(rng, 3).title(), fill=(40, 40, 40), font=normal)
        draw.rectangle((0, 28, width, 52), fill=accent)  # menu bar
        x = 10
        for word in random_words(rng, 5).split():
            draw.text((x, 33), word.title(), fill=(255, 255, 255), font=normal)
            x += 14 + 9 * len(word)
        sidebar = int(rng.choice([0, 120, 160]))
        if sidebar:
            draw.rectangle((0, 52, sidebar, height), fill=(236, 238, 241))
            for k in range(int(rng.integers(4, 10))):
                draw.text((12, 64 + 26 * k), random_words(rng, 2), fill=(60, 60, 60), font=small)
        left = sidebar + 20
        draw.text((left, 64), random_words(rng, 4).capitalize(), fill=(20, 20, 20), font=title)
        y = 96
        for _ in range(int(rng.integers(2, 6))):
            draw.text((left, y), random_words(rng, int(rng.integers(5, 11))), fill=(70, 70, 70), font=small)
            y += 20
        if rng.random() < 0.6:  # a bar chart
            base, bars = min(height - 80, y + 140), int(rng.integers(4, 9))
            for k in range(bars):
                top = base - int(rng.integers(20, 120))
                draw.rectangle((left + 30 * k, top, left + 30 * k + 20, base), fill=accent)
            y = base + 16
        for k in range(int(rng.integers(1, 4))):  # buttons
            bx = left + 110 * k
            if y + 30 < height:
                draw.rounded_rectangle((bx, y, bx + 96, y + 28), radius=6, fill=accent if k == 0 else (210, 210, 215))
                ink = (255, 255, 255) if k == 0 else (30, 30, 30)
                draw.text((bx + 14, y + 6), random_words(rng, 1).title(), fill=ink, font=normal)
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(0.6))  # a scaled screenshot
        yield f"ui_{i:02d}", image, "synthetic screenshot"


# --- main --------------------------------------------------------------------------------------------


def main(argv=None) -> dict[str, int]:
    args = parse_args(argv)
    if args.out.resolve() == ROOT or ROOT in args.out.resolve().parents:
        raise SystemExit("--out must be outside the repository (these images are not committed)")
    if args.out.exists():
        shutil.rmtree(args.out)
    generators = {
        "natural": natural_images,
        "red_cells": lambda rng: red_cell_crops(args.bccd_dir, rng),
        "blank": blank_images,
        "noise": noise_images,
        "text": text_images,
        "ui": ui_images,
    }
    rows, counts = [], {}
    for k, (kind, make) in enumerate(generators.items()):
        folder = args.out / kind
        folder.mkdir(parents=True)
        rng = np.random.default_rng([args.seed, k])  # one stream per kind: adding to one leaves the others alone
        for name, image, source in make(rng):
            lossy = kind in ("natural", "red_cells")
            path = folder / (name + (".jpg" if lossy else ".png"))
            image.save(path, **({"quality": 92} if lossy else {}))
            rows.append((path.relative_to(args.out).as_posix(), kind, source))
        counts[kind] = sum(1 for row in rows if row[1] == kind)
    with open(args.out / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "kind", "source"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} images to {args.out}: {counts}")
    return counts


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
