"""Assign every Kaggle TRAIN image to the original smear photo it was augmented from.

The Kaggle "Blood Cell Images" TRAIN folder holds ~10k augmented copies (rotation with black corners,
flips, shifts) of ~280 original 640x480 BCCD photos. A validation split must hold out whole source photos,
so each TRAIN image needs its source id. File names carry none, so we match images to originals.

Method (rotation-, flip- and shift-invariant, no training):
  1. Downscale each candidate original to 320x240 (how the augmentation started).
  2. In every image, find the white cell: the largest blob of strongly purple (blue >> red, green) pixels.
     Its centroid moves with the image under rotation, flip and shift, so it is a shared anchor.
  3. Sample the smoothed RGB image on a polar grid (24 rings, 96 angles, radius 3..80 px) around that
     anchor, zero-mean it over the non-black pixels and L2-normalise. A rotation is then a circular shift
     along the angle axis and a flip is a reversal of it, so the best normalised cross-correlation over all
     angle shifts (via FFT), for the sample and its reversal, compares the two images at their best pose.
  4. Images whose best score is low (usually a white cell cut by the frame, so the centroid is off) are
     re-scored with the anchor moved over a grid of offsets, keeping the best.
  5. Each image goes to the best-scoring candidate whose labels.csv category matches its folder; originals
     with an empty or non-TRAIN-class label (e.g. BASOPHIL only) are candidates for every class.
     Originals listed in test_simple_to_original.csv (the TEST sources) are never candidates.

Output CSV columns: path (relative to TRAIN, forward slashes), label (folder), source_id (original's id),
distance (1 - best correlation), margin (second-best distance - best distance; small = ambiguous).

A self-check makes synthetic augmentations of originals (random rotation with black corners, flips,
shifts, JPEG re-encoding), runs the same matcher and prints how many map back to their own original.

Reproduce (from the repository root, ~5 minutes on 2 cores):
    python training/experiments/group_sources.py --kaggle-dir ../shared/data/blood-cells \
        --out training/splits/kaggle_train_sources.csv

TEST (--split TEST, ~10 minutes) is grouped the same way, for per-source-photo figures in evaluation. Every
original is scored; eligible are those of the image's class that are not TRAIN sources (--train-sources, the CSV
above: TRAIN and TEST share no photo). TEST_SIMPLE is not a complete list of TEST's sources: its EOSINOPHIL
folder holds two exact duplicate pairs (originals 93 and 139), and about 48 TEST eosinophils each come from
originals 62 and 95, which are in neither TRAIN nor TEST_SIMPLE (checked by eye). So TEST has 71 source photos, not
69: 13 EOSINOPHIL (~48 images each), 6 LYMPHOCYTE (~103), 4 MONOCYTE (~155), 48 NEUTROPHIL (13). The script prints
each class's sources against TEST_SIMPLE's and fails if one of TEST_SIMPLE's is never matched:
    python training/experiments/group_sources.py --kaggle-dir ../shared/data/blood-cells --split TEST \
        --out training/splits/kaggle_test_sources.csv
"""

import argparse
import csv
import io
import os
import sys
import time
from collections import Counter
from multiprocessing import Pool

import numpy as np
from PIL import Image
from scipy import ndimage

CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
SIZE = (320, 240)  # TRAIN images are the originals downscaled 2x, then augmented
N_RINGS, N_ANGLES, R_MIN, R_MAX = 24, 96, 3.0, 80.0
RADII = np.linspace(R_MIN, R_MAX, N_RINGS)
THETA = np.arange(N_ANGLES) * 2 * np.pi / N_ANGLES
# Anchor offsets tried for low-scoring images: a white cell cut by the frame has its centroid pulled inwards.
REFINE_OFFSETS = [(dy, dx) for dy in range(-15, 16, 5) for dx in range(-15, 16, 5)]

_ORIGINAL_SPECTRA = None  # set per worker by init_worker, so it is not pickled with every task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kaggle-dir", default="../shared/data/blood-cells",
                        help="folder holding dataset-master/ and dataset2-master/")
    parser.add_argument("--split", choices=("TRAIN", "TEST"), default="TRAIN",
                        help="which dataset2-master/images folder to group (default TRAIN)")
    parser.add_argument("--out", help="default training/splits/kaggle_<split>_sources.csv")
    parser.add_argument("--train-sources", default="training/splits/kaggle_train_sources.csv",
                        help="TEST only: the TRAIN grouping; its source photos are never TEST candidates")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--refine-below", type=float, default=0.92,
                        help="re-score images whose best correlation is below this with a moved anchor")
    parser.add_argument("--selfcheck", type=int, default=100,
                        help="number of synthetic augmentations to test the matcher on (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_labels(kaggle_dir):
    """Map original id -> set of categories from labels.csv (multi-label rows are comma-joined)."""
    labels = {}
    with open(os.path.join(kaggle_dir, "dataset-master", "labels.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            cats = {c.strip().upper() for c in (row["Category"] or "").split(",") if c.strip()}
            labels[int(row["Image"])] = cats
    return labels


def read_test_ids(kaggle_dir):
    with open(os.path.join(kaggle_dir, "test_simple_to_original.csv"), newline="") as fh:
        return {int(row["original_image_id"]) for row in csv.DictReader(fh)}


def read_test_sources_by_class(kaggle_dir):
    """Class (the TEST_SIMPLE folder) -> set of original ids, from test_simple_to_original.csv."""
    out = {}
    with open(os.path.join(kaggle_dir, "test_simple_to_original.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            cls = row["test_simple_file"].replace("\\", "/").split("/")[-2].upper()
            out.setdefault(cls, set()).add(int(row["original_image_id"]))
    return out


def list_originals(kaggle_dir, exclude):
    """(id, path) of every original photo on disk whose id is not in `exclude`."""
    folder = os.path.join(kaggle_dir, "dataset-master", "JPEGImages")
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("BloodImage_") and name.endswith(".jpg"):
            oid = int(name[len("BloodImage_"):-len(".jpg")])
            if oid not in exclude:
                out.append((oid, os.path.join(folder, name)))
    return out


def list_images(kaggle_dir, split="TRAIN"):
    """(relative path with forward slashes, class) of every image of TRAIN (or TEST), sorted for determinism."""
    root = os.path.join(kaggle_dir, "dataset2-master", "images", split)
    out = []
    for cls in CLASSES:
        for name in sorted(os.listdir(os.path.join(root, cls))):
            if name.lower().endswith((".jpeg", ".jpg", ".png")):
                out.append((f"{cls}/{name}", cls))
    return root, out


def load_image(path):
    image = Image.open(path).convert("RGB")
    if image.size != SIZE:
        image = image.resize(SIZE, Image.BILINEAR)
    return np.asarray(image)


def find_valid_mask(rgb):
    # Rotation and shift borders are pure black; erode to drop JPEG ringing along their edges.
    return ndimage.binary_erosion(rgb.astype(np.int32).sum(-1) > 40, iterations=3)


def find_cell_centre(rgb, valid):
    """Centroid (row, col) of the largest strongly purple blob: the stained white-cell nucleus."""
    f = rgb.astype(np.float32)
    purple = ndimage.gaussian_filter(f[..., 2] - (f[..., 0] + f[..., 1]) / 2, 2)
    purple[~valid] = 0
    blobs, n = ndimage.label(purple > 30)
    if n == 0:
        return np.array([rgb.shape[0] / 2, rgb.shape[1] / 2])
    areas = ndimage.sum(np.ones_like(purple), blobs, range(1, n + 1))
    biggest = int(np.argmax(areas)) + 1
    return np.array(ndimage.center_of_mass(np.where(blobs == biggest, purple, 0)))


def sample_polar(smooth, valid, centre):
    """Zero-mean, unit-norm polar sample (3*rings, angles) around centre; None if mostly off-image."""
    ys = centre[0] + RADII[:, None] * np.sin(THETA)[None]
    xs = centre[1] + RADII[:, None] * np.cos(THETA)[None]
    sample = np.stack([ndimage.map_coordinates(smooth[..., ch], [ys, xs], order=1, cval=0)
                       for ch in range(3)])
    inside = ndimage.map_coordinates(valid.astype(np.float32), [ys, xs], order=1, cval=0) > 0.99
    if inside.sum() < 50:
        return None
    # Black borders must not count as image content, so they are zeroed after removing the mean.
    sample = (sample - sample[:, inside].mean(1)[:, None, None]) * inside[None]
    return (sample / (np.linalg.norm(sample) + 1e-6)).reshape(-1, N_ANGLES).astype(np.float32)


def prepare_image(rgb):
    valid = find_valid_mask(rgb)
    smooth = ndimage.gaussian_filter(rgb.astype(np.float32), (1.5, 1.5, 0))
    return smooth, valid, find_cell_centre(rgb, valid)


def describe_array(rgb):
    smooth, valid, centre = prepare_image(rgb)
    sample = sample_polar(smooth, valid, centre)
    if sample is None:  # anchor on the border: fall back to the image centre
        sample = sample_polar(smooth, valid, np.array([rgb.shape[0] / 2, rgb.shape[1] / 2]))
    return sample


def describe_path(path):
    return describe_array(load_image(path))


def compute_spectra(samples):
    """Conjugated angular FFT of original samples, laid out (freq, features, originals) for matmul."""
    return np.fft.rfft(samples, axis=-1).transpose(2, 1, 0).conj()


def correlate(samples, spectra):
    """Best circular cross-correlation over angle shifts and mirror, for each sample vs each original."""
    best = None
    for variant in (samples, samples[..., ::-1]):  # reversed angles = any flip combined with a rotation
        freq = np.fft.rfft(variant, axis=-1).transpose(2, 0, 1)
        corr = np.fft.irfft(np.matmul(freq, spectra).transpose(1, 2, 0), n=N_ANGLES, axis=-1).max(-1)
        best = corr if best is None else np.maximum(best, corr)
    return best.astype(np.float32)


def correlate_all(samples, spectra, chunk=512):
    return np.concatenate([correlate(samples[i:i + chunk], spectra) for i in range(0, len(samples), chunk)])


def init_worker(spectra):
    global _ORIGINAL_SPECTRA
    _ORIGINAL_SPECTRA = spectra


def refine_array(rgb):
    """Best score per original over anchors moved around the detected centre."""
    smooth, valid, centre = prepare_image(rgb)
    samples = [sample_polar(smooth, valid, centre + np.array(off)) for off in REFINE_OFFSETS]
    samples = np.stack([s for s in samples if s is not None])
    return correlate(samples, _ORIGINAL_SPECTRA).max(0)


def refine_path(path):
    return refine_array(load_image(path))


def build_eligibility(original_ids, labels):
    """Boolean (class, original) matrix: same class, or a label that names no TRAIN class at all."""
    eligible = np.zeros((len(CLASSES), len(original_ids)), bool)
    for j, oid in enumerate(original_ids):
        cats = labels.get(oid, set()) & set(CLASSES)
        for i, cls in enumerate(CLASSES):
            eligible[i, j] = cls in cats or not cats
    return eligible


def pick_sources(scores, class_index, eligible):
    """Best and second-best eligible original per image; returns (best index, distance, margin)."""
    masked = np.where(eligible[class_index], scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :2]
    rows = np.arange(len(scores))
    best, second = masked[rows, order[:, 0]], masked[rows, order[:, 1]]
    return order[:, 0], 1.0 - best, best - second


def augment_like_keras(rgb, rng):
    """Synthetic TRAIN-like copy: rotate (black corners), shift, flip, JPEG re-encode."""
    image = Image.fromarray(rgb)
    angle = rng.uniform(-30, 30)
    shift = (rng.uniform(-0.1, 0.1) * SIZE[0], rng.uniform(-0.1, 0.1) * SIZE[1])
    image = image.rotate(angle, resample=Image.BILINEAR, translate=shift, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_TOP_BOTTOM)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return np.asarray(Image.open(buffer).convert("RGB"))


def make_selfcheck_item(task):
    path, seed = task
    return augment_like_keras(load_image(path), np.random.default_rng(seed))


def run_selfcheck(pool, originals, spectra, n, seed, refine_below):
    """Fraction of synthetic augmentations whose best match (over all originals) is their own source."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(originals), size=min(n, len(originals)), replace=False)
    tasks = [(originals[j][1], seed * 100003 + int(j)) for j in picks]
    images = pool.map(make_selfcheck_item, tasks)
    scores = correlate_all(np.stack(pool.map(describe_array, images)), spectra)
    low = np.where(scores.max(1) < refine_below)[0]
    if len(low):
        scores[low] = np.maximum(scores[low], np.stack(pool.map(refine_array, [images[k] for k in low])))
    hits = scores.argmax(1) == picks
    return float(hits.mean()), len(picks), len(low)


def write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "source_id", "distance", "margin"])
        writer.writerows(rows)


def report(rows, eligible_counts):
    for cls in CLASSES:
        mine = [r for r in rows if r[1] == cls]
        per_source = Counter(r[2] for r in mine)
        sizes = sorted(per_source.values())
        margins = np.array([float(r[4]) for r in mine])
        print(f"{cls:11s} images={len(mine):5d} candidates={eligible_counts[cls]:3d} "
              f"sources={len(per_source):3d} per-source min/median/max={sizes[0]}/{int(np.median(sizes))}/"
              f"{sizes[-1]} margin<0.05: {np.mean(margins < 0.05):.1%}")


def main(argv=None):
    args = parse_args(argv)
    out = args.out or f"training/splits/kaggle_{args.split.lower()}_sources.csv"
    start = time.time()
    labels = read_labels(args.kaggle_dir)
    test_ids = read_test_ids(args.kaggle_dir)
    # TRAIN: the TEST sources are never candidates. TEST: every original is scored (so a best match elsewhere
    # shows up in the check below), but TRAIN's sources are not eligible.
    originals = list_originals(args.kaggle_dir, test_ids if args.split == "TRAIN" else set())
    original_ids = [oid for oid, _ in originals]
    train_root, train = list_images(args.kaggle_dir, args.split)
    print(f"{len(originals)} candidate originals, {len(train)} {args.split} images", flush=True)

    with Pool(args.workers) as pool:
        spectra = compute_spectra(np.stack(pool.map(describe_path, [p for _, p in originals])))
    with Pool(args.workers, initializer=init_worker, initargs=(spectra,)) as pool:
        paths = [os.path.join(train_root, rel) for rel, _ in train]
        scores = correlate_all(np.stack(pool.map(describe_path, paths, chunksize=32)), spectra)
        print(f"first pass done in {time.time() - start:.0f}s", flush=True)
        low = np.where(scores.max(1) < args.refine_below)[0]
        if len(low):
            refined = pool.map(refine_path, [paths[k] for k in low], chunksize=8)
            scores[low] = np.maximum(scores[low], np.stack(refined))
        print(f"refined {len(low)} low-scoring images, {time.time() - start:.0f}s", flush=True)
        if args.selfcheck:
            acc, n, n_low = run_selfcheck(pool, originals, spectra, args.selfcheck, args.seed,
                                          args.refine_below)
            print(f"self-check: {acc:.1%} of {n} synthetic augmentations matched their own original "
                  f"({n_low} needed refinement)", flush=True)

    eligible = build_eligibility(original_ids, labels)
    if args.split == "TEST":
        with open(args.train_sources, newline="") as fh:
            train_sources = {int(row["source_id"]) for row in csv.DictReader(fh)}
        eligible &= ~np.isin(original_ids, sorted(train_sources))[None]
    class_index = np.array([CLASSES.index(cls) for _, cls in train])
    best, distance, margin = pick_sources(scores, class_index, eligible)
    rows = [(rel, cls, original_ids[b], f"{d:.4f}", f"{m:.4f}")
            for (rel, cls), b, d, m in zip(train, best, distance, margin, strict=True)]
    write_csv(out, rows)
    off_class = sum(1 for k in range(len(train)) if scores[k].argmax() != best[k])
    print(f"{off_class} images whose unrestricted best match is not eligible "
          f"({'another class label' if args.split == 'TRAIN' else 'another class or a TRAIN source'})")
    report(rows, {cls: int(eligible[i].sum()) for i, cls in enumerate(CLASSES)})
    status = 0
    if args.split == "TEST":
        expected = read_test_sources_by_class(args.kaggle_dir)
        for cls in CLASSES:
            found = {int(r[2]) for r in rows if r[1] == cls}
            missing, extra = sorted(expected.get(cls, set()) - found), sorted(found - expected.get(cls, set()))
            print(f"{cls:11s} {len(found)} sources; TEST_SIMPLE has {len(expected.get(cls, ()))}"
                  + (f"; never matched: {missing}" if missing else "")
                  + (f"; not in TEST_SIMPLE: {extra}" if extra else ""))
            status |= bool(missing)
        print(f"{len({r[2] for r in rows})} distinct source photos in all")
    print(f"wrote {len(rows)} rows to {out} in {time.time() - start:.0f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
