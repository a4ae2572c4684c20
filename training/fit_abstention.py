"""Fit a model's calibration temperature and its "uncertain / not a white blood cell" rule, on validation and
training data only (never a test set), and store them with the model.

    python training/fit_abstention.py --kaggle-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN \
        --pbc-dir ../shared/data/pbc-4class

About 3 minutes on 2 idle CPU cores for MobileNetV2 (7 on busy ones; most of it the 8 test-time views of the
2,257 validation images). Run it again after every retraining: the app ignores (with a warning) parameters fitted
on another .h5. Then re-measure with training/measure_abstention.py.

Data, as training/train.py splits it:
- validation = Kaggle TRAIN's grouped validation split (read_sources + split_by_group with the fraction and seed
  of the model's metadata, else 0.15 and 1337) + the PBC `validation` rows of training/splits/pbc_split.csv;
- training = the rest of Kaggle TRAIN + the PBC `train` rows.

Steps:
1. Feature density: class means and one shared covariance of the pooled penultimate features (the `pool` layer,
   1280-d for MobileNetV2) of the training images (one of the 8 symmetric views of each, picked at random with a
   fixed seed), kept in its --components principal directions of least variance (hematovision.abstention).
   Measured on a development non-cell set (make_noncell_set.py --seed 7, not the measured one) with this model:
   full 1280-d 0.91 flagged, the 128 / 256 directions of MOST variance 0.35 / 0.65, the 256 / 384-768 of least
   variance 0.93 / 0.95, at the same validation flag rate.
2. Temperature: softmax(log(p) / T) with T = base * exp(slope * (distance - centre)) (abstention.Temperature;
   `--calibration single`: slope 0, one T), base and slope minimising the log-loss on the validation images, p
   being the model's probabilities averaged over its `test_time_views` exactly as Classifier.predict computes them
   and distance the image's distance under step 1. The validation ECE of both forms is stored with the model:
   chosen on validation, the distance form lowered it for both labs (Kaggle 0.034 -> 0.028, PBC 0.029 -> 0.016).
3. Thresholds, on the validation images: `max_distance` so that at most --distance-rate of each validation source
   (Kaggle, PBC) lies further from every class mean, and `min_probability` so that at most --confidence-rate of each
   has a calibrated top probability below it. An image beyond either is answered "uncertain".

Writes `<model>_ood.npz` (the projection and class means, ~0.7 MB) and the `calibration` and `abstention`
sections of the model's metadata JSON (with the .h5's sha256, so stale parameters are never applied).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "model": ROOT / "model" / "blood_cell_model.h5",
    "sources": ROOT / "training" / "splits" / "kaggle_train_sources.csv",
    "pbc_split": ROOT / "training" / "splits" / "pbc_split.csv",
    "components": 512,
    "distance_rate": 0.005,
    "confidence_rate": 0.005,
    "seed": 1337,
    "batch_size": 64,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kaggle-dir", required=True, type=Path, help="Kaggle dataset2-master/images/TRAIN")
    p.add_argument("--pbc-dir", type=Path, help="the PBC set, folder per class (its train/validation rows are used)")
    p.add_argument("--model", type=Path, default=DEFAULTS["model"])
    p.add_argument("--sources", type=Path, default=DEFAULTS["sources"], help="Kaggle TRAIN source-photo CSV")
    p.add_argument("--pbc-split", type=Path, default=DEFAULTS["pbc_split"], help="CSV path,label,split")
    p.add_argument("--components", type=int, default=DEFAULTS["components"],
                   help="the principal directions of least variance of the shared covariance kept for the distance")
    p.add_argument("--distance-rate", type=float, default=DEFAULTS["distance_rate"],
                   help="share of each validation source allowed beyond the distance threshold")
    p.add_argument("--confidence-rate", type=float, default=DEFAULTS["confidence_rate"],
                   help="share of each validation source allowed below the probability threshold")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="picks the one view of each training image")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--cache-dir", type=Path,
                   help="keep the model outputs here (keyed by the .h5's sha256 and the file list) for re-runs")
    p.add_argument("--calibration", choices=["distance", "single"], default="distance",
                   help="a temperature that grows with the distance to the training cells (default), or one T")
    p.add_argument("--dry-run", action="store_true", help="fit and print, but write nothing")
    return p.parse_args(argv)


# --- data --------------------------------------------------------------------------------------------


def kaggle_split(kaggle_dir: Path, labels: list[str], sources: Path, fraction: float, seed: int):
    """(training, validation) ImageSets of Kaggle TRAIN, split by source photo exactly as train.py does."""
    from hematovision.datasets import ImageSet, list_images
    from training.train import read_sources, split_by_group

    image_set = list_images(kaggle_dir, labels)
    groups = read_sources(sources, [image_set.relative(p) for p in image_set.paths])
    train_idx, val_idx = split_by_group(image_set.targets, groups, fraction, seed)
    parts = []
    for idx in (train_idx, val_idx):
        parts.append(ImageSet(root=image_set.root, labels=image_set.labels,
                              paths=[image_set.paths[i] for i in idx], targets=[image_set.targets[i] for i in idx]))
    return parts[0], parts[1]


def split_settings(metadata: dict) -> tuple[float, int]:
    settings = (metadata.get("training") or {}).get("settings") or {}
    return float(settings.get("val_fraction", 0.15)), int(settings.get("seed", 1337))


# --- model outputs -----------------------------------------------------------------------------------


def model_outputs(classifier, paths: list[Path], *, one_view_seed: int | None = None, batch_size: int = 64,
                  cache_dir: Path | None = None, label: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The model's own (uncalibrated) probabilities and pooled features of each file. With `one_view_seed`, each
    image is seen in one of its 8 flips/quarter-turns, picked at random with that seed (training images: cheap,
    and every orientation is a valid cell); else through the model's test-time views, as Classifier.predict."""
    from hematovision.classifier import symmetric_views
    from hematovision.datasets import load_arrays
    from hematovision.fast_runtime import sha256_of

    cache = None
    if cache_dir:
        key = hashlib.sha256("\n".join([sha256_of(classifier.path), str(one_view_seed),
                                        str(classifier.metadata.get("test_time_views", 1)),
                                        *map(str, paths)]).encode()).hexdigest()[:20]
        cache = Path(cache_dir) / f"{label or 'outputs'}_{key}.npz"
        if cache.is_file():
            with np.load(cache) as data:
                return data["probabilities"], data["features"]
    views = None if one_view_seed is None else np.random.default_rng(one_view_seed).integers(0, 8, len(paths))
    probabilities, features = [], []
    started = time.time()
    for start in range(0, len(paths), batch_size):
        x = load_arrays(paths[start:start + batch_size])
        if views is not None:  # each image already turned into its one view
            x = np.stack([symmetric_views(image[None], 8)[k][0] for image, k in zip(x, views[start:], strict=False)])
        p, f = classifier.run(x, views=None if views is None else 1)
        if f is None:
            raise SystemExit("This model gives no pooled features (no 'pool' layer and no final dense layer).")
        probabilities.append(p)
        features.append(f.astype(np.float32))
    print(f"  {label or 'images'}: {len(paths)} images in {time.time() - started:.0f} s", flush=True)
    result = np.concatenate(probabilities), np.concatenate(features)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, probabilities=result[0], features=result[1])
    return result


# --- fitting -----------------------------------------------------------------------------------------


def fit(train_features, train_targets, val_raw, val_targets, val_features, val_domains, *,
        components: int, distance_rate: float, confidence_rate: float, calibration: str = "distance") -> dict:
    """Density, temperature and thresholds (see the module docstring); returns them with validation figures."""
    from hematovision import abstention

    density = abstention.fit_feature_density(train_features, train_targets, components=components)
    distances = density.distances(val_features)
    single = abstention.Temperature(base=abstention.fit_temperature(val_raw, val_targets))
    temperature = (abstention.fit_distance_temperature(val_raw, val_targets, distances)
                   if calibration == "distance" else single)
    calibrated = temperature.apply(val_raw, distances)
    top = calibrated.max(axis=1)
    domains = sorted(set(val_domains))
    max_distance = max(abstention.threshold_for_rate(distances[val_domains == d], distance_rate) for d in domains)
    min_probability = min(abstention.threshold_for_rate(top[val_domains == d], confidence_rate, upper=False)
                          for d in domains)
    rule = abstention.AbstentionRule(min_probability=min_probability, max_distance=max_distance, density=density)
    flagged = np.array([r is not None for r in rule.decide(calibrated, distances)])
    figures = {"n": int(len(val_targets))}
    for name, members in [("all", np.ones(len(val_targets), bool))] + [(d, val_domains == d) for d in domains]:
        y, raw, cal = val_targets[members], val_raw[members], calibrated[members]
        figures[name] = {
            "n": int(members.sum()),
            "accuracy": float((cal.argmax(1) == y).mean()),
            "log_loss_before": abstention.negative_log_likelihood(raw, y),
            "log_loss_after": abstention.negative_log_likelihood(cal, y),
            "ece_before": abstention.expected_calibration_error(raw, y),
            "ece_after": abstention.expected_calibration_error(cal, y),
            "ece_single_temperature": abstention.expected_calibration_error(
                single.apply(raw), y),
            "flag_rate": float(flagged[members].mean()),
            "flag_rate_distance": float((distances[members] > max_distance).mean()),
            "flag_rate_confidence": float((top[members] < min_probability).mean()),
        }
    return {"temperature": temperature, "single_temperature": single.base, "density": density,
            "max_distance": max_distance, "min_probability": min_probability, "validation": figures}


def write(model_path: Path, fitted: dict, record: dict) -> Path:
    """The npz beside the model and the metadata's `calibration` and `abstention` sections."""
    from hematovision.classifier import abstention_path_for, metadata_path_for
    from hematovision.fast_runtime import sha256_of

    model_sha = sha256_of(model_path)
    npz = abstention_path_for(model_path)
    npz.write_bytes(fitted["density"].to_bytes())
    meta_path = metadata_path_for(model_path)
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    figures = fitted["validation"]
    metadata["calibration"] = {
        "method": ("temperature scaling: softmax(log(p) / T) of the test-time-averaged probabilities, with "
                   "T = temperature * exp(distance_slope * (distance - distance_centre)), distance as in 'abstention' "
                   "(hematovision.abstention.Temperature; slope 0 = one temperature)"),
        "temperature": fitted["temperature"].base,
        "distance_slope": fitted["temperature"].slope,
        "distance_centre": fitted["temperature"].centre,
        "single_temperature": fitted["single_temperature"],
        "fitted_on": record["validation_data"],
        "model_sha256": model_sha,
        "validation": {name: {k: v for k, v in f.items() if "flag" not in k}
                       for name, f in figures.items() if isinstance(f, dict)},
        "command": record["command"],
        "created": record["created"],
    }
    metadata["abstention"] = {
        "method": ("uncertain when the calibrated top probability < min_probability (low confidence), or when the "
                   "Mahalanobis distance of the pooled features to the nearest class mean (shared covariance, its "
                   f"{fitted['density'].projection.shape[1]} principal directions of least variance) > max_distance "
                   "(not like any training cell)"),
        "file": npz.name,
        "file_sha256": sha256_of(npz),
        "min_probability": fitted["min_probability"],
        "max_distance": fitted["max_distance"],
        "density_fitted_on": record["training_data"],
        "thresholds_chosen_on": record["validation_data"] + "; " + record["rates"],
        "model_sha256": model_sha,
        "validation": {name: {k: v for k, v in f.items() if k == "n" or "flag" in k}
                       for name, f in figures.items() if isinstance(f, dict)},
        "command": record["command"],
        "created": record["created"],
    }
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return npz


def image_sets(classifier, kaggle_dir: Path, sources: Path, pbc_dir: Path | None, pbc_split: Path) -> dict:
    """{"kaggle": (train, validation), "pbc": (train, validation)}: Kaggle TRAIN split by source photo with the
    model's own fraction and seed, and PBC's train/validation rows (when pbc_dir is given)."""
    from training.evaluate import split_rows

    labels = classifier.labels
    fraction, split_seed = split_settings(classifier.metadata)
    sets = {"kaggle": kaggle_split(kaggle_dir, labels, sources, fraction, split_seed)}
    if pbc_dir:
        sets["pbc"] = (split_rows(pbc_dir, pbc_split, "train", labels),
                       split_rows(pbc_dir, pbc_split, "validation", labels))
    return sets


def gather_outputs(classifier, sets: dict, *, seed: int, batch_size: int, cache_dir: Path | None) -> dict:
    """The model's outputs over image_sets(): pooled features of the training images (one seeded view each), raw
    probabilities and features of the validation images, their targets and which set each came from."""
    parts: dict[str, list] = {key: [] for key in ("train_features", "train_targets", "val_raw", "val_features",
                                                  "val_targets", "val_domains")}
    for name, (train_set, val_set) in sets.items():
        _, features = model_outputs(classifier, train_set.paths, one_view_seed=seed, batch_size=batch_size,
                                    cache_dir=cache_dir, label=f"{name}_train")
        parts["train_features"].append(features)
        parts["train_targets"].append(np.asarray(train_set.targets))
        raw, features = model_outputs(classifier, val_set.paths, batch_size=batch_size, cache_dir=cache_dir,
                                      label=f"{name}_validation")
        parts["val_raw"].append(raw)
        parts["val_features"].append(features)
        parts["val_targets"].append(np.asarray(val_set.targets))
        parts["val_domains"].append(np.full(len(val_set.paths), name))
    return {key: np.concatenate(values) for key, values in parts.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import datetime as dt

    from hematovision.classifier import load_classifier

    classifier = load_classifier(args.model)
    fraction, split_seed = split_settings(classifier.metadata)
    sets = image_sets(classifier, args.kaggle_dir, args.sources, args.pbc_dir, args.pbc_split)
    kaggle_train, kaggle_val = sets["kaggle"]
    print(f"model {args.model} ({classifier.runtime}), views {classifier.metadata.get('test_time_views', 1)}; "
          + ", ".join(f"{name}: {len(t.paths)} train / {len(v.paths)} validation" for name, (t, v) in sets.items()),
          flush=True)
    outputs = gather_outputs(classifier, sets, seed=args.seed, batch_size=args.batch_size, cache_dir=args.cache_dir)

    fitted = fit(outputs["train_features"], outputs["train_targets"], outputs["val_raw"], outputs["val_targets"],
                 outputs["val_features"], outputs["val_domains"], components=args.components,
                 distance_rate=args.distance_rate, confidence_rate=args.confidence_rate, calibration=args.calibration)
    print(f"temperature {fitted['temperature']} (one temperature: "
          f"{fitted['single_temperature']:.4f}); min_probability {fitted['min_probability']:.4f}; "
          f"max_distance {fitted['max_distance']:.3f}")
    print(json.dumps(fitted["validation"], indent=2))

    split_text = f"grouped by source photo, fraction {fraction}, seed {split_seed}"
    record = {
        "validation_data": (f"Kaggle TRAIN grouped validation split ({len(kaggle_val.paths)} images, {split_text})"
                            + (f" + PBC validation rows of {args.pbc_split.name} ({len(sets['pbc'][1].paths)})"
                               if "pbc" in sets else "")),
        "training_data": (f"Kaggle TRAIN minus its validation split ({len(kaggle_train.paths)} images)"
                          + (f" + PBC train rows of {args.pbc_split.name} ({len(sets['pbc'][0].paths)})"
                             if "pbc" in sets else "")
                          + f"; one random symmetric view per image (seed {args.seed})"),
        "rates": f"at most {args.distance_rate:g} of each source beyond max_distance, "
                 f"{args.confidence_rate:g} below min_probability",
        "command": "python training/fit_abstention.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if not args.dry_run:
        npz = write(args.model, fitted, record)
        print(f"wrote {npz} ({npz.stat().st_size / 1e6:.2f} MB) and the metadata's calibration/abstention")
    return fitted


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
