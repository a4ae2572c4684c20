"""The steps after training that every model needs before the app may serve it, shared by train.py and
adapt.py: save the .h5 and its TFLite twin, fit the calibration and the "uncertain" rule on validation crops,
and measure the held-out crops through the same Classifier the app uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training import metrics
from training.cropsets import CropSet


def export(model, path: Path, metadata: dict) -> None:
    """Write the float32 .h5, its metadata JSON and the TFLite file derived from it (with its stamp)."""
    from hematovision.classifier import metadata_path_for
    from hematovision.fast_runtime import convert_keras_model, sha256_of, with_features, write_tflite

    model.save(path)
    metadata_path_for(path).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    write_tflite(path, convert_keras_model(with_features(model)), sha256_of(path))


def validation_scores(model, val: dict) -> dict:
    """{lab: accuracy} of a Keras model on each lab's validation crops {lab: (crops, targets)}."""
    return {lab: float((model.predict(x, batch_size=64, verbose=0).argmax(1) == y).mean())
            for lab, (x, y) in val.items() if len(y)}


def outputs(classifier, crops: np.ndarray, *, one_view_seed: int | None = None, batch_size: int = 64):
    """The model's own probabilities and pooled features of each crop. With `one_view_seed` each crop is seen
    in one of its 8 flips/quarter-turns, picked with that seed (every orientation is a valid cell)."""
    from hematovision.classifier import symmetric_views

    rng = np.random.default_rng(one_view_seed) if one_view_seed is not None else None
    probabilities, features = [], []
    for start in range(0, len(crops), batch_size):
        x = crops[start:start + batch_size]
        if rng is not None:
            x = np.stack([symmetric_views(image[None], 8)[k][0] for image, k in zip(x, rng.integers(0, 8, len(x)),
                                                                                   strict=True)])
        p, f = classifier.run(x, views=1 if rng is not None else None)
        probabilities.append(p)
        features.append(np.asarray(f, np.float32))
    k = len(classifier.labels)
    if not probabilities:
        return np.zeros((0, k)), np.zeros((0, 0), np.float32)
    return np.concatenate(probabilities), np.concatenate(features)


def fit_calibration(train_features, train_targets, val_raw, val_targets, val_features, val_domains, *,
                    components: int = 512, distance_rate: float = 0.005, confidence_rate: float = 0.005,
                    calibration: str = "distance", other_train: np.ndarray | None = None,
                    other_validation: np.ndarray | None = None, other_types=(), other_rate: float = 0.005) -> dict:
    """Density of the training cells' features, temperature and thresholds, fitted on validation only.
    The thresholds let at most `distance_rate` / `confidence_rate` / `other_rate` of each validation lab be flagged.
    `other_train`: features of training cells of types the model does not classify (`other_types`, e.g.
    BASOPHIL); with them, a score for such cells is fitted too (abstention.fit_other_types), and `other_validation`
    (the same types' validation cells) is only measured: the share of them flagged."""
    from hematovision import abstention

    components = min(components, train_features.shape[1], max(1, len(train_targets) - len(set(train_targets))))
    density = abstention.fit_feature_density(train_features, train_targets, components=components)
    distances = density.distances(val_features)
    if not np.all(np.isfinite(distances)):  # too few training cells for a covariance: no distance test
        density = distances = None
    single = abstention.Temperature(base=abstention.fit_temperature(val_raw, val_targets))
    temperature = (abstention.fit_distance_temperature(val_raw, val_targets, distances)
                   if calibration == "distance" and distances is not None else single)
    calibrated = temperature.apply(val_raw, distances)
    top = calibrated.max(axis=1)
    domains = sorted(set(val_domains))
    max_distance = (max(abstention.threshold_for_rate(distances[val_domains == d], distance_rate) for d in domains)
                    if distances is not None else None)
    min_probability = min(abstention.threshold_for_rate(top[val_domains == d], confidence_rate, upper=False)
                          for d in domains)
    other = max_other = other_scores = None
    if other_train is not None and len(other_train) and density is not None:
        other = abstention.fit_other_types(train_features, other_train, other_types)
        other_scores = other.scores(val_features)
        max_other = max(abstention.threshold_for_rate(other_scores[val_domains == d], other_rate) for d in domains)
    rule = abstention.AbstentionRule(min_probability=min_probability, max_distance=max_distance, density=density,
                                     other=other, max_other_score=max_other)
    flagged = np.array([r is not None for r in rule.decide(calibrated, distances, other_scores=other_scores)])
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
            "flag_rate": float(flagged[members].mean()),
            "flag_rate_distance": float((distances[members] > max_distance).mean()) if density else 0.0,
            "flag_rate_confidence": float((top[members] < min_probability).mean()),
        } | ({"flag_rate_other_type": float((other_scores[members] > max_other).mean())} if other is not None else {})
    if other is not None and other_validation is not None and len(other_validation):
        figures["other_types"] = {"n": int(len(other_validation)),
                                  "flag_rate_other_type": float((other.scores(other_validation) > max_other).mean())}
    return {"temperature": temperature, "single_temperature": single.base, "density": density,
            "max_distance": max_distance, "min_probability": min_probability, "other": other,
            "max_other_score": max_other, "validation": figures}


def write_calibration(model_path: Path, fitted: dict, record: dict) -> None:
    """The `<model>_ood.npz` beside the model and the metadata's `calibration` and `abstention` sections, tied
    to the .h5 by its sha256 so stale parameters are never applied. A `density` of None (a model without pooled
    features to measure distances on) gives the low-confidence test alone, and no npz."""
    from hematovision import abstention
    from hematovision.classifier import abstention_path_for, metadata_path_for
    from hematovision.fast_runtime import sha256_of

    model_sha = sha256_of(model_path)
    npz = abstention_path_for(model_path)
    density, other = fitted["density"], fitted.get("other")
    if density is not None:
        npz.write_bytes(abstention.rule_arrays(density, other))
    meta_path = metadata_path_for(model_path)
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    figures = fitted["validation"]
    metadata["calibration"] = {
        "method": ("temperature scaling: softmax(log(p) / T), T = temperature * exp(distance_slope * (distance - "
                   "distance_centre)), distance as in 'abstention' (hematovision.abstention.Temperature)"),
        "temperature": fitted["temperature"].base,
        "distance_slope": fitted["temperature"].slope,
        "distance_centre": fitted["temperature"].centre,
        "single_temperature": fitted["single_temperature"],
        "fitted_on": record["validation_data"],
        "model_sha256": model_sha,
        "validation": {name: {k: v for k, v in f.items() if "flag" not in k}
                       for name, f in figures.items() if isinstance(f, dict) and name != "other_types"},
    }
    metadata["abstention"] = {
        "method": ("uncertain when the calibrated top probability < min_probability (low confidence), or when the "
                   "Mahalanobis distance of the pooled features to the nearest class mean (shared covariance, its "
                   f"{density.projection.shape[1]} principal directions of least variance) > max_distance "
                   "(not like any training cell)" if density is not None else
                   "uncertain when the calibrated top probability < min_probability (low confidence)"),
        "file": npz.name if density is not None else None,
        "file_sha256": sha256_of(npz) if density is not None else None,
        "min_probability": fitted["min_probability"],
        "max_distance": fitted["max_distance"] if density is not None else None,
        "density_fitted_on": record["training_data"],
        "other_types": ({
            "types": list(other.types),
            "method": ("uncertain (another type of white cell) when the score features @ other_weights + "
                       f"other_bias (in {npz.name}) > max_score: logistic regression (C "
                       f"{abstention.OTHER_TYPES_REGULARISATION:g}, balanced, standardised features) of these types' "
                       "training cells against the four types'"),
            "max_score": fitted["max_other_score"],
            "fitted_on": record.get("other_data", ""),
            "validation_flag_rate": figures.get("other_types", {}).get("flag_rate_other_type"),
            "validation_n": figures.get("other_types", {}).get("n"),
        } if density is not None and other is not None else None),
        "thresholds_chosen_on": record["validation_data"] + "; " + record["rates"],
        "model_sha256": model_sha,
        "validation": {name: {k: v for k, v in f.items() if k == "n" or "flag" in k}
                       for name, f in figures.items() if isinstance(f, dict) and name != "other_types"},
    }
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def assess_crops(classifier, cropset: CropSet, *, unknown_type: bool = False, sources: bool = False,
                 batch_size: int = 64) -> dict:
    """Figures of the model on one held-out set, as the app answers it: files where no white cell was found
    count as wrong and as "uncertain" (reason no_white_cell_found). Targets of -1 (a cell type the model does not
    know, e.g. LISC's basophils) are reported apart: the share answered "uncertain"."""
    labels = classifier.labels
    targets = np.asarray(cropset.rows.targets)
    answers = [classifier.assess(cropset.crops[i:i + batch_size]) for i in range(0, len(cropset.crops), batch_size)]
    k = len(labels)
    raw = np.full((len(targets), k), 1.0 / k)
    probabilities = np.full((len(targets), k), 1.0 / k)
    reasons: list[str | None] = ["no_white_cell_found"] * len(targets)
    if answers:
        raw[cropset.found] = np.concatenate([a.raw for a in answers])
        probabilities[cropset.found] = np.concatenate([a.probabilities for a in answers])
        found_at = np.flatnonzero(cropset.found)
        for i, reason in zip(found_at, [r for a in answers for r in a.reasons], strict=True):
            reasons[i] = reason
    predicted = np.where(cropset.found, probabilities.argmax(1), -1)
    known = targets >= 0
    result = metrics.summarise(targets[known], predicted[known], labels)
    result.update(metrics.summarise_abstention(targets[known], raw[known], probabilities[known],
                                               [r for r, kn in zip(reasons, known, strict=True) if kn], labels))
    result["no_white_cell_found"] = int((~cropset.found[known]).sum())
    if unknown_type and (~known).any():
        flagged = np.array([r is not None for r in reasons])[~known]
        result["unknown_type"] = {"n": int((~known).sum()), "flagged": int(flagged.sum()),
                                  "flag_rate": float(flagged.mean()),
                                  "reasons": metrics.count_reasons([r for r, kn in zip(reasons, known, strict=True)
                                                                    if not kn])}
    if sources:
        result["per_source"] = metrics.summarise_sources(
            targets[known], probabilities[known], [r for r, kn in zip(reasons, known, strict=True) if kn],
            [g for g, kn in zip(cropset.rows.groups, known, strict=True) if kn])
    return result
