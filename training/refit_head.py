"""Refit the model's final Dense layer by linear discriminant analysis on its own pooled features.

    python training/refit_head.py --kaggle-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN \
        --pbc-dir ../shared/data/pbc-4class --out /tmp/refit/blood_cell_model.h5 [--cache-dir /tmp/hv]

then, as after any new model (with --model pointing at the refit): `python -m hematovision.fast_runtime`,
`training/fit_abstention.py` and `training/evaluate.py`. The refit drops the metadata's calibration, abstention
and test figures: they belong to the old head.

Not used by the shipped model. On model G it raised validation accuracy (Kaggle 0.869 -> 0.880, PBC 0.978 ->
0.997) but, read afterwards, lost Kaggle TEST (0.923 -> 0.877; monocytes 607 -> 465 of 620) while PBC test rose
(0.974 -> 0.985): model/provenance/head_refit/ and the model card's ablation table.

Why: the head is trained together with the base, under dropout and augmentation, while the features move under it
every step. Refitted afterwards on the final features, a Gaussian model with one shared covariance (LDA) is a
linear softmax layer again: class k's score is x . S^-1 m_k - m_k . S^-1 m_k / 2 + log p_k, with the class means m_k,
the shared covariance S (Ledoit-Wolf shrinkage, so no setting to tune) and the class shares p_k. It is written
as the Dense layer's kernel and bias, so the architecture, the .h5 format, the TFLite runtime and Grad-CAM stay
as they were, and the features (hence the distance used for abstention) do not change.

Fitted on the training images only (Kaggle TRAIN minus its grouped validation split, and PBC's train rows; one
random flip or quarter-turn per image, seeded, as fit_abstention's density). The validation images judge it: the
script prints the old and the new head's validation accuracy per lab, and --keep-if-worse is off by default, so
a refit that loses on validation is not written. Test sets are not read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.fit_abstention import DEFAULTS as FIT_DEFAULTS  # noqa: E402

STALE_SECTIONS = ("calibration", "abstention", "evaluation")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kaggle-dir", required=True, type=Path, help="Kaggle dataset2-master/images/TRAIN")
    p.add_argument("--pbc-dir", type=Path, help="the PBC set, folder per class (its train/validation rows are used)")
    p.add_argument("--model", type=Path, default=FIT_DEFAULTS["model"])
    p.add_argument("--out", type=Path, required=True, help="where to write the refitted model and its metadata")
    p.add_argument("--sources", type=Path, default=FIT_DEFAULTS["sources"], help="Kaggle TRAIN source-photo CSV")
    p.add_argument("--pbc-split", type=Path, default=FIT_DEFAULTS["pbc_split"], help="CSV path,label,split")
    p.add_argument("--seed", type=int, default=FIT_DEFAULTS["seed"], help="picks the one view of each training image")
    p.add_argument("--batch-size", type=int, default=FIT_DEFAULTS["batch_size"])
    p.add_argument("--cache-dir", type=Path, help="keep the model's outputs here between runs")
    p.add_argument("--keep-if-worse", action="store_true",
                   help="write the refit even if its mean validation accuracy over the labs is lower")
    return p.parse_args(argv)


def fit_discriminant(features: np.ndarray, targets: np.ndarray, classes: int):
    """A shrunk shared-covariance LDA on (N, D) features; every class must be present."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    if sorted(set(int(t) for t in targets)) != list(range(classes)):
        raise ValueError("every class needs training images")
    return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(features, targets)


def linear_weights(lda) -> tuple[np.ndarray, np.ndarray]:
    """(D, classes) kernel and (classes,) bias whose softmax is the LDA's predict_proba."""
    coef, intercept = np.asarray(lda.coef_, np.float64), np.asarray(lda.intercept_, np.float64)
    if coef.shape[0] == 1:  # scikit-learn folds two classes into one score
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef.T, intercept


def set_head(model, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Put the weights into the model's final softmax Dense layer (its shapes must match)."""
    import keras

    head = model.layers[-1]
    if not (isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax):
        raise SystemExit("The model does not end in a softmax Dense layer; there is no head to refit.")
    old_kernel, old_bias = head.get_weights()
    if old_kernel.shape != kernel.shape or old_bias.shape != bias.shape:
        raise SystemExit(f"Head shapes differ: model {old_kernel.shape}, refit {kernel.shape}")
    head.set_weights([kernel.astype(old_kernel.dtype), bias.astype(old_bias.dtype)])


def accuracy_by_domain(probabilities: np.ndarray, targets: np.ndarray, domains: np.ndarray) -> dict:
    right = probabilities.argmax(axis=1) == targets
    by_domain = {str(d): float(right[domains == d].mean()) for d in sorted(set(domains))}
    return {"accuracy": float(right.mean()), "n": int(len(targets)), "by_domain": by_domain,
            "mean_over_domains": float(np.mean(list(by_domain.values())))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import keras
    import scipy.special
    import sklearn

    from hematovision.classifier import load_classifier, metadata_path_for
    from hematovision.datasets import load_arrays
    from training.fit_abstention import gather_outputs, image_sets

    out = args.out
    classifier = load_classifier(args.model)
    labels = classifier.labels
    sets = image_sets(classifier, args.kaggle_dir, args.sources, args.pbc_dir, args.pbc_split)
    kaggle_train = sets["kaggle"][0]
    outputs = gather_outputs(classifier, sets, seed=args.seed, batch_size=args.batch_size, cache_dir=args.cache_dir)
    x_train, y_train = outputs["train_features"], outputs["train_targets"]
    val_raw, x_val, y_val, domains = (outputs[k] for k in ("val_raw", "val_features", "val_targets", "val_domains"))

    lda = fit_discriminant(x_train, y_train, len(labels))
    kernel, bias = linear_weights(lda)
    refit = scipy.special.softmax(x_val @ kernel + bias, axis=1)
    before, after = accuracy_by_domain(val_raw, y_val, domains), accuracy_by_domain(refit, y_val, domains)
    print(f"validation accuracy, old head: {before['by_domain']} (mean {before['mean_over_domains']:.4f}); "
          f"refit: {after['by_domain']} (mean {after['mean_over_domains']:.4f})", flush=True)
    if after["mean_over_domains"] < before["mean_over_domains"] and not args.keep_if_worse:
        print("The refit is worse on validation: nothing written.")
        return {"written": False, "before": before, "after": after}

    model = keras.models.load_model(args.model, compile=False)
    set_head(model, kernel, bias)
    # The written model must give what was measured: the Keras model against the refit, on validation images.
    check_paths = [p for _name, (_t, v) in sets.items() for p in v.paths[:8]]
    check_features = np.concatenate([x_val[domains == name][:8] for name in sets])
    keras_probabilities = np.asarray(model.predict_on_batch(load_arrays(check_paths).astype(np.float32)))
    expected = scipy.special.softmax(check_features @ kernel + bias, axis=1)
    gap = float(np.abs(keras_probabilities - expected).max())
    if gap > 1e-3:
        raise SystemExit(f"The refitted model disagrees with the refit by {gap:.2g}: not written.")

    metadata = dict(classifier.metadata)
    dropped = [key for key in STALE_SECTIONS if metadata.pop(key, None) is not None]
    counts = np.bincount(y_train, minlength=len(labels))
    metadata["head_refit"] = {
        "method": "linear discriminant analysis on the pooled features: one shared covariance with Ledoit-Wolf "
                  "shrinkage, class shares as priors (scikit-learn LinearDiscriminantAnalysis(solver='lsqr', "
                  "shrinkage='auto')), written as the final Dense layer's kernel and bias",
        "training_data": (f"Kaggle TRAIN minus its validation split ({len(kaggle_train.paths)} images)"
                          + (f" + PBC train rows ({len(sets['pbc'][0].paths)})" if "pbc" in sets else "")
                          + f"; one random symmetric view per image (seed {args.seed})"),
        "class_counts": {label: int(n) for label, n in zip(labels, counts, strict=True)},
        "validation_before": before,
        "validation_after": after,
        "keras_check_max_abs_difference": gap,
        "scikit_learn": sklearn.__version__,
        "command": "python training/refit_head.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv)),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata["validation"] = {"accuracy": after["accuracy"], "n": after["n"], "by_domain": after["by_domain"],
                              "note": "after the head refit (head_refit); the training run's own figures are in "
                                      "head_refit.validation_before"}
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    metadata_path_for(out).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} and its metadata (dropped, to be refitted: {', '.join(dropped) or 'nothing'})")
    return {"written": True, "before": before, "after": after, "out": str(out)}


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
