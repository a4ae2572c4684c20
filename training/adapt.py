"""Adapt a HematoVision model to a new lab (microscope, camera, stain) from a few labelled images per class.

    python training/adapt.py --data-dir my_lab/ --out model/my_lab.h5

--data-dir holds one folder per class (EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL, any case) with at least 2
images each (5 to 20 is the intended range). Images may be cell crops or whole smear fields: each goes through
hematovision.imaging.prepare_field, as an upload does, and its primary white cell (nearest the centre) is used;
the run says so for every file with several cells, and leaves out (naming them) files with none. Then serve the
result with the same pages and API:

    FLASK_MODEL_PATH=model/my_lab.h5 python app.py

Without labels, `--unlabelled DIR` (any folder of the lab's images) adapts the statistics alone; it may be given
with --data-dir too (statistics from both, the classifier from the labelled images). It takes about a minute on
this 2-core CPU, end to end (measure_adaptation.py times it; the README gives the figures).

What adapts, chosen on validation cells of labs the base model never saw (never their test cells;
training/experiments/measure_adaptation.py). A first grid (statistics mix 0 / 0.5 / 0.75 / 1 x L2 1e-6 ... 1e-3 x
served views 1 / 8, k = 1, 5, 20 cells per class, 3 draws each) chose the form below; a second one on the current
leave-one-lab-out model (mix 0.5 / 0.75 / 1 x L2 1e-5 / 1e-4, 8 views; results/adaptation.json) narrowed the mix
to 0.5-0.75; the last chose both on two labs' validation cells at k = 5, the case a lab is asked for (mix 0 / 0.5 /
0.75 x L2 1e-5 / 1e-4 / 1e-3, 8 views, 3 draws, each lab with its own leave-one-lab-out model, trained without grey
crops; results/adaptation_choose_{lisc,pbc}.json): mix 0.75 and L2 1e-4, LISC 0.938, PBC 0.924 (mean 0.931; mix 0.5:
0.926 / 0.909; mix 0, the classifier alone: 0.890 / 0.916). On PBC the base itself reads 0.926 on those cells: a
lab the base already reads well gains nothing from 5 cells per class. With one cell per class (which the command
refuses) an earlier LISC base preferred mix 0.5 (0.837 against 0.761).
1. statistics: every batch-normalisation layer's mean and variance becomes a mix, --stats-mix (0.75) of the lab's
   (measured on the lab's images) and the rest the base model's. The network's weights are unchanged. Alone, with
   the base's classifier, this lowers the accuracy; with the refitted classifier it is what helps most (first grid,
   k = 5: 0.95 without it, 0.98 with it; second grid, LISC, mean over k = 1, 5, 20: mix 0.5 0.919, 0.75 0.893, 1
   0.820, most of the gap at k = 1).
2. classifier: the final dense layer is refitted on the pooled features of the labelled images, each seen in its
   8 flips/quarter-turns, by logistic regression pulled towards the base's weights (L2 --head-l2, 1e-4, on the
   difference): the few images move the class boundaries, the base keeps what they cannot tell.
3. fine-tune: the layers from --fine-tune-from (block_10_expand) on, batch norm frozen, and the classifier are
   trained for --fine-tune-steps (80) batches of 32 augmented copies of the labelled images (crop, scale, turns,
   mirror, mild stain and light jitter, blur), Adam from --fine-tune-lr (1e-4), cosine to 0; a fixed number of
   steps, so 20 images per class take as long as 5. Chosen on validation cells at k = 5 with each lab's
   leave-one-lab-out model (training/experiments/measure_adapt_fine_tune.py, results/adapt_fine_tune_{lisc,pbc}
   .json; 4 and 3 draws): after steps 1-2, LISC 0.936 -> 0.965 (every draw up), PBC 0.924 -> 0.936 (two of three
   up); learning rate 2e-4 for half as long: 0.936 / 0.922; halfway back to the weights before it (weight
   interpolation): 0.959 / 0.937. An earlier try (20 epochs from block 13, the whole-frame era's base, which read
   0.978 on LISC validation without it) found no gain: that base left nothing to gain. Those runs started at
   block_13_expand; from block_10_expand (results/adapt_fine_tune_depth_{lisc,pbc}.json, the current
   leave-one-lab-out models, 3 draws, as fast per step) LISC 0.954 -> 0.972, PBC 0.927 -> 0.937 (twice the steps
   from block 13: 0.965 / 0.939); with 5 draws (results/adapt_fine_tune_deeper_{lisc,pbc}.json), from
   block_6_expand 0.952 / 0.951 and half the learning rate for twice the steps 0.966 / 0.935, against 0.962 / 0.952
   for these defaults; training's colour jitter (stain and light 0.15) instead of the milder one 0.951 / 0.943
   (results/adapt_fine_tune_jitter_{lisc,pbc}.json, the same draws). One fine-tune's result also depends on the
   order of its batches; the mean of three runs' weights (seeds s, s+1, s+2) read lower on LISC, 0.956 against
   0.972 (results/adapt_fine_tune_runs_lisc.json), so one run it is; serving the mean of three runs' answers
   (an ensemble, up to 3x the serving cost) read 0.959 on LISC over 5 draws, against 0.962 for this run alone
   and 0.957 for the mean of the 15 single runs (results/adapt_fine_tune_ensemble_lisc.json; its rule, fixed
   first, asked for a gain on both labs, so PBC was not run): the runs err on the same cells; batches that each
   hold every labelled crop once (128 steps) read 0.959 / 0.941 against 0.972 / 0.951 for this loop
   (results/adapt_fine_tune_batch_{lisc,pbc}.json).
4. served with --test-time-views 8 (the metadata's test_time_views): the answer is the mean over a cell's 8
   flips/quarter-turns (k = 5: 0.96 with one view, 0.98 with 8), 8 model runs per cell.
5. figures, calibration and the "uncertain" rule, from the given images alone (there is nothing else):
   leave-one-out (the classifier of step 2 refitted without each image, then asked about it as served; repeating
   the fine-tune for each image would take n times as long, so the figures leave its gain out) gives the
   adaptation's accuracy and the probabilities a temperature is fitted on (not below 1: a sharper one would be
   fitted to luck); the low-confidence threshold stays the base's; the distance rule keeps the base's principal
   directions and class means with the lab's class means (from the adapted model) added, its threshold the larger
   of the base's and the given images' leave-one-out distances. The base's test for white cells of other types
   (basophils) is not carried over: it was fitted on the base's features, which the lab's statistics move.
Tried and not taken, with the earlier whole-frame model: the classifier fitted on each image alone instead of its
8 views (k = 5: 0.86 against 0.91), and colour-jittered copies added for it (no gain).

Writes OUT.h5, its metadata JSON (an `adaptation` section: base model and its sha256, images per class, when, the
method, the leave-one-out figures; `name` says it is an adaptation), OUT.tflite and OUT_ood.npz, staged in a
temporary folder beside --out and moved into place at the end: nothing half-written on a refusal or a crash.
A mistake in the input (a class folder missing or empty, an unknown folder, fewer than 2 images of a class, an
unreadable image, an --out that exists) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm as _tqdm

from training import config
from training.splits import DataError

DEFAULTS = {
    "base": config.SHIPPED_MODEL,
    "stats_mix": 0.75,
    "head_l2": 1e-4,
    "views": 8,
    "test_time_views": 8,
    "fine_tune_steps": 80,
    "fine_tune_from": "block_10_expand",
    "fine_tune_lr": 1e-4,
    "fine_tune_batch": 32,
    "min_per_class": 2,
    "min_unlabelled": 4,
    "batch_size": 32,
    "seed": config.SEED,
}
def tqdm(*args, **kwargs):
    """Progress bars on stdout, with the run's other messages: stderr carries only a refusal's one line."""
    return _tqdm(*args, file=sys.stdout, **kwargs)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_TEMPERATURE = 1.0  # the leave-one-out temperature is not allowed to sharpen the probabilities


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="one folder per class (any case) with the lab's labelled images")
    p.add_argument("--unlabelled", type=Path, help="a folder of the lab's unlabelled images (statistics only)")
    p.add_argument("--out", required=True, type=Path, help="the adapted model to write (.h5; .json, .tflite beside)")
    p.add_argument("--base", type=Path, default=DEFAULTS["base"], help="the model to adapt")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--stats-mix", type=float, default=DEFAULTS["stats_mix"],
                   help="share of the lab's own batch-norm statistics (0: the base's, 1: the lab's alone)")
    p.add_argument("--head-l2", type=float, default=DEFAULTS["head_l2"],
                   help="pull of the refitted classifier towards the base's (L2 on the weight difference)")
    p.add_argument("--views", type=int, default=DEFAULTS["views"], choices=(1, 2, 4, 8),
                   help="flips/quarter-turns of each labelled image the classifier is refitted on")
    p.add_argument("--test-time-views", type=int, default=DEFAULTS["test_time_views"], choices=(1, 2, 4, 8),
                   help="views the adapted model is served with, its answer their mean (the metadata's "
                        "test_time_views: 8 costs 8 model runs per cell)")
    p.add_argument("--fine-tune-steps", type=int, default=DEFAULTS["fine_tune_steps"],
                   help="batches of augmented copies of the labelled images the top blocks are fine-tuned on "
                        "(0: no fine-tune, the statistics and the refitted classifier alone)")
    p.add_argument("--fine-tune-from", default=DEFAULTS["fine_tune_from"],
                   help="the first layer the fine-tune trains (batch-norm layers stay frozen)")
    p.add_argument("--fine-tune-lr", type=float, default=DEFAULTS["fine_tune_lr"],
                   help="the fine-tune's starting learning rate (cosine to 0)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = p.parse_args(argv)
    if args.data_dir is None and args.unlabelled is None:
        p.error("give --data-dir (labelled images) and/or --unlabelled (statistics only)")
    if not 0.0 <= args.stats_mix <= 1.0:
        p.error("--stats-mix must be between 0 and 1")
    if args.head_l2 <= 0:
        p.error("--head-l2 must be positive")
    if args.fine_tune_steps < 0 or args.fine_tune_lr <= 0:
        p.error("--fine-tune-steps must be 0 or more and --fine-tune-lr positive")
    if args.test_time_views > args.views:
        p.error("--test-time-views cannot exceed --views")
    return args


# --- the lab's images ----------------------------------------------------------------------------------------


@dataclass
class LabImages:
    """The canonical crops of the lab's images (their primary white cell), with their class (-1: unlabelled)."""

    paths: list[Path] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # per file: several cells, or none found

    @property
    def labelled(self) -> np.ndarray:
        return np.asarray(self.targets, int) >= 0


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")
                  and f.suffix.lower() in IMAGE_SUFFIXES)


def labelled_files(folder: Path, labels: list[str], min_per_class: int) -> list[tuple[Path, int]]:
    """(file, class index) of a folder-per-class directory, or DataError naming what is wrong with it."""
    if not folder.is_dir():
        raise DataError(f"--data-dir not found: {folder}")
    index = {label.upper(): i for i, label in enumerate(labels)}
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name.upper() not in index]
    if unknown:
        raise DataError(f"unknown class folder(s) in {folder}: {', '.join(unknown)}; expected one folder per class: "
                        f"{', '.join(labels)} (any case)")
    by_class: dict[str, list[Path]] = {}
    for p in folders:
        if p.name.upper() in by_class:
            raise DataError(f"two folders for {p.name.upper()} in {folder}: keep one")
        by_class[p.name.upper()] = [p]
    loose = [f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DataError(f"images directly in {folder} (e.g. {loose[0]}): put each in the folder of its class")
    missing = [label for label in labels if label.upper() not in by_class]
    if missing:
        raise DataError(f"no folder for {', '.join(missing)} in {folder}: each class needs at least "
                        f"{min_per_class} images")
    files = []
    for label in labels:
        class_dir = by_class[label.upper()][0]
        found = _image_files(class_dir)
        if len(found) < min_per_class:
            raise DataError(f"{class_dir.name}: {len(found) or 'no'} image(s), at least {min_per_class} needed "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        files += [(f, index[label.upper()]) for f in found]
    return files


def unlabelled_files(folder: Path, minimum: int) -> list[tuple[Path, int]]:
    if not folder.is_dir():
        raise DataError(f"--unlabelled folder not found: {folder}")
    found = _image_files(folder)
    if len(found) < minimum:
        raise DataError(f"--unlabelled {folder}: {len(found)} image(s), at least {minimum} needed")
    return [(f, -1) for f in found]


def read_images(files: list[tuple[Path, int]], root_of: dict[int, Path], labels: list[str]) -> LabImages:
    """Each file through the app's path; the primary cell's crop. Unreadable files stop the run (all named);
    files without a white cell are left out, each named."""
    from hematovision.imaging import ImageRejected, prepare_field

    images = LabImages()
    unreadable = []
    for path, target in tqdm(files, desc="images", unit="img", leave=False):
        name = _shown(path, root_of.get(target, root_of.get(-1)))
        try:
            found = prepare_field(path.read_bytes())
        except (ImageRejected, OSError) as exc:
            unreadable.append(f"{name} ({exc})")
            continue
        if found.primary is None:
            images.notes.append(f"{name}: no white cell found, left out")
            continue
        if len(found.cells) > 1:
            images.notes.append(f"{name}: {len(found.cells)} white cells found, the one nearest the centre is used")
        images.paths.append(path)
        images.crops.append(found.primary_crop)
        images.targets.append(target)
    if unreadable:
        raise DataError(f"unreadable image(s): {'; '.join(unreadable[:5])}"
                        + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""))
    return images


def _shown(path: Path, root: Path | None) -> str:
    try:
        return path.relative_to(root.parent).as_posix() if root else path.name
    except ValueError:
        return path.name


# --- the adaptation itself (a Keras model in memory; measure_adaptation.py calls these) ------------------------


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer of the model, nested models included."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += batch_norm_layers(layer)
    return found


def adapt_statistics(model, crops: np.ndarray, mix: float, batch_size: int = DEFAULTS["batch_size"],
                     progress: bool = True) -> int:
    """Batch-norm statistics := mix * the lab's + (1 - mix) * the model's own. The lab's are measured by running
    the model in training mode over the crops (each layer then normalises with the batch's statistics, so every
    layer sees its inputs as the lab's images make them), averaged over batches. Returns the number of layers."""
    layers = batch_norm_layers(model)
    if not layers or not mix or not len(crops):
        return 0
    saved = [(layer.trainable, layer.momentum, layer.moving_mean.numpy(), layer.moving_variance.numpy())
             for layer in layers]
    try:
        starts = range(0, len(crops), batch_size)
        for i, start in enumerate(tqdm(starts, desc="statistics", unit="batch", leave=False, disable=not progress)):
            for layer in layers:
                layer.trainable = True  # Keras runs a frozen batch-norm layer in inference mode whatever `training`
                layer.momentum = i / (i + 1)  # a running average over the batches
            model(np.asarray(crops[start:start + batch_size], np.float32), training=True)
    finally:
        for layer, (trainable, momentum, mean, variance) in zip(layers, saved, strict=True):
            layer.trainable, layer.momentum = trainable, momentum
            layer.moving_mean.assign(mix * layer.moving_mean.numpy() + (1 - mix) * mean)
            layer.moving_variance.assign(mix * layer.moving_variance.numpy() + (1 - mix) * variance)
    return len(layers)


def head_layer(model):
    """The final dense layer (its input: the pooled features of hematovision.fast_runtime.feature_output)."""
    import keras

    layer = model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise DataError(f"the base model's last layer is {type(layer).__name__}, not the dense classifier")
    return layer


class FeatureRunner:
    """crops -> (probabilities, pooled features) of a Keras model in inference mode, one traced graph."""

    def __init__(self, model, batch_size: int = DEFAULTS["batch_size"]):
        import tensorflow as tf

        from hematovision.fast_runtime import with_features

        both = with_features(model)
        self.batch_size = batch_size
        def serve(x):
            return both(x, training=False)

        self._serve = tf.function(serve, reduce_retracing=True)

    def __call__(self, crops: np.ndarray, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = [], []
        starts = range(0, len(crops), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
            p, f = self._serve(np.asarray(crops[start:start + self.batch_size], np.float32))
            probabilities.append(np.asarray(p, np.float64))
            features.append(np.asarray(f, np.float64))
        if not probabilities:
            return np.zeros((0, 0)), np.zeros((0, 0))
        return np.concatenate(probabilities), np.concatenate(features)


class ResettableModel:
    """A base model loaded once, with one FeatureRunner; fresh() puts its weights back before each adaptation (the
    measurements adapt one base many times)."""

    def __init__(self, path: Path):
        from hematovision.network import load_model

        self.model = load_model(path)
        self.weights = [w.copy() for w in self.model.get_weights()]
        self.runner = FeatureRunner(self.model)  # one traced graph: it reads the weights as they are

    def fresh(self):
        self.model.set_weights(self.weights)
        return self.model


def view_features(runner: FeatureRunner, crops: np.ndarray, views: int, desc: str | None = None) -> np.ndarray:
    """(N, views, D) pooled features of each crop in its first `views` flips/quarter-turns (view 0: as it is)."""
    from hematovision.classifier import symmetric_views

    stacked = np.concatenate(symmetric_views(np.asarray(crops), views))  # view-major
    _, features = runner(stacked, desc)
    return features.reshape(views, len(crops), -1).transpose(1, 0, 2)


def fit_head(features: np.ndarray, targets: np.ndarray, start: tuple[np.ndarray, np.ndarray], l2: float,
             prior: tuple[np.ndarray, np.ndarray] | None = None, classes: int | None = None):
    """Multinomial logistic regression, mean cross-entropy + l2 * |W - W_prior|^2 (the bias is free), by L-BFGS
    from `start`. `prior` defaults to `start` (the base's weights)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    w_prior = (prior or start)[0].astype(np.float64)
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, int)
    n, d = x.shape
    k = classes or w_prior.shape[1]
    rows = np.arange(n)

    def loss(theta):
        w, b = theta[:d * k].reshape(d, k), theta[d * k:]
        log_p = log_softmax(x @ w + b, axis=1)
        diff = w - w_prior
        value = -log_p[rows, y].mean() + l2 * (diff * diff).sum()
        grad = np.exp(log_p)
        grad[rows, y] -= 1.0
        grad /= n
        return value, np.concatenate([(x.T @ grad + 2 * l2 * diff).ravel(), grad.sum(0)])

    theta0 = np.concatenate([start[0].astype(np.float64).ravel(), start[1].astype(np.float64)])
    result = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return result.x[:d * k].reshape(d, k), result.x[d * k:]


def softmax_of(features: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.asarray(features, np.float64) @ head[0] + head[1], axis=1)


def served_probabilities(runner: FeatureRunner, crops: np.ndarray, head: tuple[np.ndarray, np.ndarray],
                         views: int) -> np.ndarray:
    """What an adapted model served with `views` test-time views answers for these crops, with classifier `head`:
    the mean over the crops' first `views` flips/quarter-turns (the measurements score adaptations with it)."""
    from hematovision.classifier import symmetric_views

    return np.mean([softmax_of(runner(view)[1], head) for view in symmetric_views(np.asarray(crops), views)], axis=0)


def fine_tune(model, crops: np.ndarray, targets: np.ndarray, *, steps: int = DEFAULTS["fine_tune_steps"],
              first_layer: str = DEFAULTS["fine_tune_from"], learning_rate: float = DEFAULTS["fine_tune_lr"],
              batch_size: int = DEFAULTS["fine_tune_batch"], seed: int = DEFAULTS["seed"],
              progress: bool = True, stain: float = 0.05, light: float = 0.1) -> int:
    """Train the layers from `first_layer` on, and the classifier, for `steps` batches of augmented copies of the
    labelled crops (training/augment.py, by default with milder colour jitter than training, `stain` and `light`:
    the lab's own colours are what it learns), each pass over the crops in a new order; Adam, the learning rate
    cosine-decayed to 0. The number of steps is fixed, so the time does not grow with the number of images.
    Returns the trainable layer count."""
    import keras

    from hematovision.network import flat_layers, set_trainable_from
    from training.augment import augment

    crops = np.asarray(crops)
    targets = np.asarray(targets, int)
    if not steps or not len(crops):
        return 0
    count = set_trainable_from(model, first_layer)  # ValueError for a name the model lacks (run() refuses it early)
    keras.utils.set_random_seed(seed)
    for layer in flat_layers(model):  # dropout draws from a generator seeded when the model was loaded: re-seed it,
        generator = getattr(layer, "seed_generator", None)  # so that one seed gives one result however often a
        if generator is not None:  # loaded model is adapted (the measurement scripts adapt one base many times)
            generator.state.assign(np.array([seed, 0], dtype=generator.state.dtype))
    rng = np.random.default_rng(seed)
    size = int(model.input_shape[1])
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
                  loss="sparse_categorical_crossentropy")
    order = np.zeros(0, int)
    try:
        for _ in tqdm(range(steps), desc="fine-tune", unit="step", leave=False, disable=not progress):
            while len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(crops))])
            batch, order = order[:batch_size], order[batch_size:]
            model.train_on_batch(augment(crops[batch], size, rng, stain=stain, light=light, blur=0.2), targets[batch])
    finally:
        model.trainable = False  # every layer frozen again, as the statistics step and serving expect
    return count


def check_fine_tune_from(model, first_layer: str) -> None:
    """DataError unless the model has a layer of that name (nested models included) to fine-tune from."""
    from hematovision.network import flat_layers

    if first_layer not in {layer.name for layer in flat_layers(model)}:
        raise DataError(f"the base model has no layer '{first_layer}' to fine-tune from; pass --fine-tune-from "
                        "with one of its layers, or --fine-tune-steps 0")


def without_optimizer(model):
    """A copy of the model with its weights and no compiled training state: the fine-tune's optimiser would
    otherwise be saved into the .h5 and traced into the .tflite."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


@dataclass
class Adaptation:
    """What adapt() changed and measured, for the metadata and the measurement script."""

    batch_norm_layers: int
    head: tuple[np.ndarray, np.ndarray] | None  # the final classifier (W, b), None when no labels
    base_head: tuple[np.ndarray, np.ndarray]
    features: np.ndarray  # (n, views, D) of the labelled crops, as the adapted model makes them
    unlabelled_features: np.ndarray  # (m, D) of the unlabelled crops (view 0), as the adapted model makes them
    targets: np.ndarray
    seconds: dict
    # the classifier refit before the fine-tune, and the features it was fitted on (leave_one_out() repeats it)
    refit_head: tuple[np.ndarray, np.ndarray] | None = None
    refit_features: np.ndarray | None = None
    fine_tuned_layers: int = 0


def adapt(model, crops: np.ndarray, targets: np.ndarray, *, unlabelled: np.ndarray | None = None,
          stats_mix: float = DEFAULTS["stats_mix"], head_l2: float = DEFAULTS["head_l2"],
          views: int = DEFAULTS["views"], batch_size: int = DEFAULTS["batch_size"],
          fine_tune_steps: int = DEFAULTS["fine_tune_steps"], fine_tune_from: str = DEFAULTS["fine_tune_from"],
          fine_tune_lr: float = DEFAULTS["fine_tune_lr"], seed: int = DEFAULTS["seed"],
          runner: FeatureRunner | None = None, progress: bool = True) -> Adaptation:
    """Adapt `model` in place: batch-norm statistics on all the lab's crops (labelled and unlabelled), then the
    dense classifier refitted on the labelled crops' pooled features, then (fine_tune_steps > 0) a short
    fine-tune of the top blocks and the classifier on augmented copies of the labelled crops. `runner`: a
    FeatureRunner of this very model, to reuse its traced graph (it reads the weights as they are)."""
    crops = np.asarray(crops)
    targets = np.asarray(targets, int)
    unlabelled = np.zeros((0, *crops.shape[1:]), np.uint8) if unlabelled is None else np.asarray(unlabelled)
    head = head_layer(model)
    base_head = tuple(w.copy() for w in head.get_weights())
    seconds = {}
    started = time.perf_counter()
    everything = np.concatenate([crops, unlabelled]) if len(unlabelled) else crops
    count = adapt_statistics(model, everything, stats_mix, batch_size, progress)
    seconds["statistics"] = time.perf_counter() - started
    runner = runner or FeatureRunner(model, batch_size)

    def labelled_features():
        return (view_features(runner, crops, views, "features" if progress else None) if len(crops)
                else np.zeros((0, views, 0)))

    started = time.perf_counter()
    features = labelled_features()
    seconds["features"] = time.perf_counter() - started
    refit, refit_features, tuned = None, None, 0
    if len(crops):
        started = time.perf_counter()
        refit = fit_head(features.reshape(-1, features.shape[-1]), np.repeat(targets, views), base_head, head_l2)
        head.set_weights([refit[0].astype(np.float32), refit[1].astype(np.float32)])
        refit_features = features
        seconds["head"] = time.perf_counter() - started
        if fine_tune_steps:
            started = time.perf_counter()
            tuned = fine_tune(model, crops, targets, steps=fine_tune_steps, first_layer=fine_tune_from,
                              learning_rate=fine_tune_lr, seed=seed, progress=progress)
            features = labelled_features()
            seconds["fine_tune"] = time.perf_counter() - started
    unlabelled_features = runner(unlabelled)[1] if len(unlabelled) else np.zeros((0, features.shape[-1]))
    final = tuple(w.astype(np.float64) for w in head.get_weights()) if refit is not None else None
    return Adaptation(count, final, base_head, features, unlabelled_features, targets, seconds, refit,
                      refit_features, tuned)


def leave_one_out(adaptation: Adaptation, head_l2: float, served_views: int = 1, progress: bool = True) -> np.ndarray:
    """(n, classes) probabilities of each labelled image, as the app would answer it (the mean over its first
    `served_views` views, the model's test_time_views), from the classifier refitted without any view of it,
    warm-started from the full fit. The statistics keep every image (a small optimism). It repeats the classifier
    refit before any fine-tune: fine-tuning once per image would take n times as long, so these figures leave the
    fine-tune's gain out."""
    features, targets = adaptation.refit_features, adaptation.targets
    n, views, d = features.shape
    probabilities = np.zeros((n, adaptation.base_head[0].shape[1]))
    for i in tqdm(range(n), desc="leave-one-out", unit="img", leave=False, disable=not progress):
        keep = np.arange(n) != i
        head = fit_head(features[keep].reshape(-1, d), np.repeat(targets[keep], views), adaptation.refit_head,
                        head_l2, prior=adaptation.base_head)
        probabilities[i] = softmax_of(features[i, :served_views], head).mean(axis=0)
    return probabilities


# --- calibration and the "uncertain" rule from the given images ------------------------------------------------


def fit_rule(adaptation: Adaptation, loo_probabilities: np.ndarray, base_classifier, served_views: int = 1) -> dict:
    """The `fitted` dict of training.pipeline.fit_calibration, from the given images alone (module docstring):
    a temperature fitted on the leave-one-out probabilities (not below MIN_TEMPERATURE), the base's
    low-confidence threshold, and the base's feature density with the lab's class means (over all views) added,
    its threshold the larger of the base's and the given images' leave-one-out distances (each image as served,
    one view, to the means made without it; unlabelled images: to all the means)."""
    from hematovision import abstention

    base_rule = base_classifier.rule
    targets = adaptation.targets
    single = abstention.Temperature()
    if len(targets):
        single = abstention.Temperature(base=max(MIN_TEMPERATURE,
                                                 abstention.fit_temperature(loo_probabilities, targets)))
    density, max_distance = base_rule.density, base_rule.max_distance
    feature_size = adaptation.features.shape[-1] if len(targets) else adaptation.unlabelled_features.shape[-1]
    if density is None or max_distance is None or density.feature_size != feature_size:
        density, max_distance = None, None  # a base without a usable density: the low-confidence test alone
    distances = np.zeros(0)
    if density is not None:
        z = np.einsum("nvd,dk->nvk", adaptation.features, density.projection) if len(targets) else None
        lab_means = [z[targets == k].mean(axis=(0, 1)) for k in np.unique(targets)] if len(targets) else []
        distances = loo_distances(z, targets, density.class_means, served_views) if len(targets) else np.zeros(0)
        density = abstention.FeatureDensity(projection=density.projection, class_means=np.concatenate(
            [density.class_means, *(m[None] for m in lab_means)]).astype(np.float32))
        if len(adaptation.unlabelled_features):
            distances = np.concatenate([distances, density.distances(adaptation.unlabelled_features)])
        if len(distances):
            max_distance = max(float(max_distance), float(distances.max()))
    min_probability = base_rule.min_probability
    figures = {"n": int(len(targets))}
    if len(targets):
        calibrated = single.apply(loo_probabilities)
        loo = distances[:len(targets)] if density is not None else None
        flagged = np.array([r is not None for r in abstention.AbstentionRule(
            min_probability=min_probability, max_distance=max_distance, density=density).decide(calibrated, loo)])
        figures["all"] = {
            "n": int(len(targets)),
            "accuracy": float((calibrated.argmax(1) == targets).mean()),
            "log_loss_before": abstention.negative_log_likelihood(loo_probabilities, targets),
            "log_loss_after": abstention.negative_log_likelihood(calibrated, targets),
            "ece_before": abstention.expected_calibration_error(loo_probabilities, targets),
            "ece_after": abstention.expected_calibration_error(calibrated, targets),
            "flag_rate": float(flagged.mean()),
            "flag_rate_distance": float((loo > max_distance).mean()) if loo is not None else 0.0,
            "flag_rate_confidence": float((calibrated.max(1) < (min_probability or 0)).mean()),
        }
    return {"temperature": single, "single_temperature": single.base, "density": density,
            "max_distance": max_distance, "min_probability": min_probability, "validation": figures,
            "lab_distances": distances}


def loo_distances(z: np.ndarray, targets: np.ndarray, base_means: np.ndarray, served_views: int = 1) -> np.ndarray:
    """(n, views, k) whitened features -> each image's distance, as served (the mean of its first `served_views`
    views), to the nearest of the base's class means and the lab's class means (over all views) made without it
    (a class left with no image: none)."""
    out = np.zeros(len(z))
    everyone = np.arange(len(z))
    for i in everyone:
        others = everyone != i
        lab = [z[others & (targets == k)].mean(axis=(0, 1)) for k in np.unique(targets[others])]
        centres = np.concatenate([base_means, *(m[None] for m in lab)])
        out[i] = float(np.sqrt(((centres - z[i, :served_views].mean(0)) ** 2).sum(1).min()))
    return out


# --- the command -------------------------------------------------------------------------------------------------


def check_paths(args) -> None:
    if args.out.suffix.lower() != ".h5":
        raise DataError(f"--out must name a .h5 file, not {args.out.name}")
    from hematovision.classifier import abstention_path_for, metadata_path_for
    from hematovision.fast_runtime import tflite_path_for

    if not args.force:
        for path in (args.out, metadata_path_for(args.out), tflite_path_for(args.out), abstention_path_for(args.out)):
            if path.exists():
                raise DataError(f"{path} exists; pass --force to replace it (or choose another --out)")
    if not args.base.is_file():
        raise DataError(f"--base model not found: {args.base}")
    if args.out.resolve() == args.base.resolve():
        raise DataError("--out is the --base model itself; write the adaptation to another file")


def describe(args, argv, base_metadata: dict, base_sha: str, images: LabImages, labels: list[str],
             adaptation: Adaptation, loo: dict | None, seconds: float) -> dict:
    """The base's metadata, with what describes the base's own data moved under `adaptation`."""
    targets = np.asarray(images.targets, int)
    per_class = {label: int((targets == k).sum()) for k, label in enumerate(labels)}
    metadata = {k: v for k, v in base_metadata.items()
                if k not in ("calibration", "abstention", "evaluation", "validation")}
    lab = args.data_dir or args.unlabelled
    metadata["name"] = (f"{base_metadata.get('name') or args.base.stem}, adapted to the lab of "
                        f"'{lab.resolve().name}' ({sum(per_class.values())} labelled images"
                        + (f", {int((targets < 0).sum())} unlabelled" if (targets < 0).any() else "") + ")")
    metadata["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    labelled = bool(adaptation.head is not None)
    method = [f"batch-norm statistics of {adaptation.batch_norm_layers} layers: {args.stats_mix:g} x the lab's "
              f"(all {len(targets)} images) + {1 - args.stats_mix:g} x the base's" if adaptation.batch_norm_layers
              else "statistics unchanged (no batch-norm layer in the base, or --stats-mix 0)"]
    if labelled:
        method.append(f"final dense layer refitted on the pooled features of the labelled images in {args.views} "
                      f"flips/quarter-turns each: logistic regression, L2 {args.head_l2:g} on the difference to "
                      "the base's weights")
        if adaptation.fine_tuned_layers:
            method.append(f"then {adaptation.fine_tuned_layers} layers from {args.fine_tune_from} on (batch norm "
                          f"frozen) and the classifier fine-tuned for {args.fine_tune_steps} batches of "
                          f"{DEFAULTS['fine_tune_batch']} augmented copies of the labelled images (Adam, learning "
                          f"rate {args.fine_tune_lr:g} cosine-decayed to 0)")
    else:
        method.append("classifier unchanged (no labelled images)")
    metadata["adaptation"] = {
        "base_model": args.base.name,
        "base_sha256": base_sha,
        "base_name": base_metadata.get("name"),
        "base_created": base_metadata.get("created"),
        "created": metadata["created"],
        "command": config.command_line("training/adapt.py", argv),
        "data": config.display_path(lab),
        "images_per_class": per_class,
        "unlabelled_images": int((targets < 0).sum()),
        "notes": images.notes,
        "method": "; ".join(method),
        "chosen_on": ("LISC and PBC validation cells, each with a model that never saw that lab "
                      "(training/experiments/measure_adaptation.py, results/adaptation_choose_{lisc,pbc}.json)"),
        "settings": {"stats_mix": args.stats_mix, "head_l2": args.head_l2, "views": args.views,
                     "test_time_views": args.test_time_views, "fine_tune_steps": args.fine_tune_steps,
                     "fine_tune_from": args.fine_tune_from, "fine_tune_lr": args.fine_tune_lr, "seed": args.seed},
        "figures": loo,
        "seconds": round(seconds, 1),
        "base_evaluation": base_metadata.get("evaluation"),
        "base_validation": base_metadata.get("validation"),
    }
    metadata["evaluation"] = {}
    metadata["test_time_views"] = args.test_time_views
    return metadata


def run(args, argv=None) -> dict:
    started = time.time()
    check_paths(args)
    base_metadata_path = args.base.with_suffix(".json")
    if not base_metadata_path.is_file():
        raise DataError(f"--base metadata not found: {base_metadata_path}")
    base_metadata = json.loads(base_metadata_path.read_text(encoding="utf-8"))
    labels = list(base_metadata["labels"])
    files, roots = [], {}
    if args.data_dir is not None:
        files += labelled_files(args.data_dir, labels, DEFAULTS["min_per_class"])
        roots.update({k: args.data_dir for k in range(len(labels))})
    if args.unlabelled is not None:
        files += unlabelled_files(args.unlabelled, DEFAULTS["min_unlabelled"])
        roots[-1] = args.unlabelled
    print(f"adapt.py: {len(files)} images; finding their white cells", flush=True)
    images = read_images(files, roots, labels)
    for note in images.notes:
        print(f"  {note}", flush=True)
    targets = np.asarray(images.targets, int)
    if args.data_dir is not None:
        short = [label for k, label in enumerate(labels) if (targets == k).sum() < DEFAULTS["min_per_class"]]
        if short:
            raise DataError(f"fewer than {DEFAULTS['min_per_class']} images with a white cell for "
                            f"{', '.join(short)} (see the notes above)")
    elif len(targets) < DEFAULTS["min_unlabelled"]:
        raise DataError(f"fewer than {DEFAULTS['min_unlabelled']} unlabelled images with a white cell")

    import keras

    from hematovision.classifier import load_classifier
    from training import pipeline

    keras.utils.set_random_seed(args.seed)
    base_classifier = load_classifier(args.base, runtime="tf.function")  # its Keras model; no .tflite needed
    model = base_classifier.model
    crops = np.stack(images.crops)
    labelled = targets >= 0
    if args.fine_tune_steps and labelled.any():
        check_fine_tune_from(model, args.fine_tune_from)  # before any work
    print(f"adapt.py: adapting {args.base.name} ({int(labelled.sum())} labelled, {int((~labelled).sum())} "
          "unlabelled images)", flush=True)
    adaptation = adapt(model, crops[labelled], targets[labelled], unlabelled=crops[~labelled],
                       stats_mix=args.stats_mix, head_l2=args.head_l2, views=args.views,
                       fine_tune_steps=args.fine_tune_steps, fine_tune_from=args.fine_tune_from,
                       fine_tune_lr=args.fine_tune_lr, seed=args.seed)
    served_views = args.test_time_views
    loo_probabilities = (leave_one_out(adaptation, args.head_l2, served_views) if adaptation.head is not None
                         else np.zeros((0, len(labels))))
    fitted = fit_rule(adaptation, loo_probabilities, base_classifier, served_views)
    loo = None
    if len(loo_probabilities):
        from training import metrics

        calibrated = fitted["temperature"].apply(loo_probabilities)
        loo = {"method": ("leave-one-out on the given images: the classifier refitted without each image (all its "
                          "views), then asked about it as it is; the batch-norm statistics keep every image"
                          + ("; before the fine-tune, which is not repeated without each image (on validation "
                             "cells of two labs it added 0.029 and 0.012 at 5 images per class: "
                             "training/experiments/results/adapt_fine_tune_{lisc,pbc}.json)"
                             if adaptation.fine_tuned_layers else "")),
               **metrics.summarise(adaptation.targets, calibrated.argmax(1), labels),
               "log_loss": fitted["validation"]["all"]["log_loss_after"],
               "ece": fitted["validation"]["all"]["ece_after"]}
        print(f"adapt.py: leave-one-out accuracy {loo['accuracy']:.3f} on {loo['n']} images "
              f"(95% interval {loo['accuracy_ci95'][0]:.2f}-{loo['accuracy_ci95'][1]:.2f})", flush=True)

    if adaptation.fine_tuned_layers:
        model = without_optimizer(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=args.out.stem + ".", dir=args.out.parent))
    try:
        staged = staging / args.out.name
        metadata = describe(args, argv, base_metadata, base_classifier.sha256, images, labels, adaptation, loo,
                            time.time() - started)
        with tqdm(total=2, desc="export", leave=False) as bar:
            pipeline.export(model, staged, metadata)
            bar.update()
            n_lab = int(labelled.sum())
            pipeline.write_calibration(staged, fitted, {
                "validation_data": (f"leave-one-out probabilities of the {n_lab} labelled images "
                                    f"(temperature not below {MIN_TEMPERATURE:g})" if n_lab else
                                    "the base model's (no labelled images)"),
                "training_data": (f"the base's principal directions and class means ({args.base.name}), with the "
                                  "lab's class means added (pooled features of the labelled images, all views)"),
                "rates": ("min_probability: the base's; max_distance: the larger of the base's and the given images' "
                          "leave-one-out distances (each image, as served, to the means made without it)"),
            })
            bar.update()
        metadata = json.loads(staged.with_suffix(".json").read_text(encoding="utf-8"))
        metadata["adaptation"]["seconds"] = round(time.time() - started, 1)
        staged.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        for path in sorted(staging.iterdir(), key=lambda p: p.suffix == ".h5"):  # the .h5 last
            os.replace(path, args.out.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"adapt.py: wrote {args.out} and its .json, .tflite, _ood.npz in {time.time() - started:.0f} s; serve it "
          f"with FLASK_MODEL_PATH={args.out} python app.py", flush=True)
    return metadata


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args, argv)
    except DataError as exc:
        print(f"adapt.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nadapt.py: interrupted; nothing was written at --out", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
