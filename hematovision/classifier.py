"""Load the shipped model and its metadata once, and classify model-input arrays fast.

The model's answer is calibrated (temperature scaling) and may be "uncertain" (hematovision.abstention): both
are fitted by training/train.py (or training/adapt.py) and travel with the model, in its metadata JSON and
`<model>_ood.npz`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hematovision import fast_runtime
from hematovision.abstention import AbstentionRule, FeatureDensity, Temperature, load_other_types
from hematovision.fast_runtime import sha256_of, with_features
from hematovision.imaging import IMAGE_SIZE

RUNTIMES = ("tflite", "tf.function")  # tflite: hematovision.fast_runtime; tf.function: the Keras graph itself
DEFAULT_RUNTIME = "tflite"
DEFAULT_MIN_PROBABILITY = 0.6  # the "uncertain" threshold of a model without a fitted abstention rule


class ModelLoadError(RuntimeError):
    """The model or its metadata is missing or unreadable. There is no fallback."""


def metadata_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def abstention_path_for(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + "_ood.npz")


@dataclass
class Assessment:
    """The model's answer for a batch: calibrated probabilities, and per image why it is "uncertain" (None: it
    is not; else hematovision.abstention.LOW_CONFIDENCE, OTHER_TYPE or UNLIKE_TRAINING)."""

    probabilities: np.ndarray  # (N, classes), calibrated
    raw: np.ndarray  # (N, classes), the network's own, before the temperature
    features: np.ndarray | None  # (N, D) pooled penultimate features, mean over the test-time views
    distances: np.ndarray | None  # (N,) Mahalanobis distance to the nearest training class, when fitted
    reasons: list[str | None]
    other_scores: np.ndarray | None = None  # (N,) how much each looks like a white cell of another type, when fitted

    @property
    def uncertain(self) -> np.ndarray:
        return np.array([reason is not None for reason in self.reasons], dtype=bool)


@dataclass
class Classifier:
    """A Keras model plus the metadata that travels with it (labels, image size, figures), its calibration
    (a temperature, which may grow with the distance to the training cells) and its abstention rule."""

    metadata: dict
    path: Path
    sha256: str = ""  # of the .h5 file, read once at load (the calibration and the .tflite are checked against it)
    _call: object = field(default=None, repr=False)  # float32 batch -> (probabilities, features or None)
    runtime: str = "tf.function"  # the runtime actually in use (tflite falls back to tf.function, logged)
    calibration: Temperature = field(default_factory=Temperature)
    rule: AbstentionRule = field(default_factory=lambda: AbstentionRule(min_probability=DEFAULT_MIN_PROBABILITY))

    _model: object = field(default=None, repr=False)
    _model_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model(self):
        """The Keras model itself (Grad-CAM, tests). With a fresh TFLite file it is loaded on first use only:
        serving then never imports TensorFlow, the slowest part of a start-up."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = load_keras_model(self.path)
        return self._model

    @property
    def temperature(self) -> float:
        """The base temperature (the temperature of an image at the median validation distance)."""
        return self.calibration.base

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    def run(self, batch: np.ndarray, views: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 224, 224, 3) uint8 -> the model's own (uncalibrated) probabilities and its pooled features,
        each the mean over `views` test-time views (default: the metadata's `test_time_views`)."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.shape[1:] != (*IMAGE_SIZE, 3):
            raise ValueError(f"expected (N, {IMAGE_SIZE[0]}, {IMAGE_SIZE[1]}, 3), got {batch.shape}")
        views = int(self.metadata.get("test_time_views", 1)) if views is None else views
        outputs = [self._call(view) for view in symmetric_views(batch.astype(np.float32), views)]
        probabilities = np.mean([np.asarray(p, dtype=np.float64) for p, _ in outputs], axis=0)
        if any(f is None for _, f in outputs):
            return probabilities, None
        return probabilities, np.mean([np.asarray(f, dtype=np.float64) for _, f in outputs], axis=0)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, classes) calibrated probabilities."""
        return self.assess(batch).probabilities

    def assess(self, batch: np.ndarray, min_probability: float | None = None) -> Assessment:
        """Calibrated probabilities and the abstention decision, from one model run. `min_probability`
        overrides the fitted low-confidence threshold (e.g. the app's UNCERTAIN_BELOW setting)."""
        raw, features = self.run(batch)
        distances = self.rule.distances(features)
        other_scores = self.rule.other_scores(features)
        probabilities = self.calibration.apply(raw, distances)
        reasons = self.rule.decide(probabilities, distances, min_probability, other_scores)
        return Assessment(probabilities=probabilities, raw=raw, features=features, distances=distances,
                          reasons=reasons, other_scores=other_scores)

    def min_probability(self, override: float | None = None) -> float:
        """The low-confidence threshold in use: `override` when given, else the fitted one (or the default)."""
        if override is not None:
            return float(override)
        return float(self.rule.min_probability if self.rule.min_probability is not None else 0.0)


def symmetric_views(batch: np.ndarray, count: int) -> list[np.ndarray]:
    """Test-time augmentation: the first `count` of 8 flips/turns of each image (1 = the image as it is).
    A white cell has no up or down, so every view is an equally valid input; averaging them steadies the answer.
    Order: identity, mirror, half-turn, half-turn mirrored (= vertical flip), then the quarter-turns."""
    if count not in (1, 2, 4, 8):
        raise ValueError(f"test_time_views must be 1, 2, 4 or 8, not {count}")
    views = []
    for k in (0, 2, 1, 3):
        turned = np.rot90(batch, k, axes=(1, 2))
        views += [turned, turned[:, :, ::-1]]
    return [np.ascontiguousarray(view) for view in views[:count]]


def load_classifier(
    model_path: str | Path, runtime: str = DEFAULT_RUNTIME, pool_size: int = 2, num_threads: int | None = None
) -> Classifier:
    """Read the .h5 model and its JSON metadata; raise ModelLoadError with a clear message.

    `runtime` "tflite" (default) runs a float32 TFLite model derived from the .h5 (see fast_runtime);
    "tf.function" runs the Keras graph directly. `pool_size`: TFLite interpreters shared by threads, each using
    `num_threads` CPU threads (None: all cores)."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"Unknown inference runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}.")
    model_path = Path(model_path)
    meta_path = metadata_path_for(model_path)
    if not model_path.is_file():
        raise ModelLoadError(f"Model file not found: {model_path}. Train one (training/train.py) or set the path.")
    if not meta_path.is_file():
        raise ModelLoadError(f"Model metadata not found: {meta_path} (it must sit next to the model file).")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        labels = metadata["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Model metadata {meta_path} is unreadable or has no 'labels': {exc}") from exc
    model_sha = sha256_of(model_path)  # once: the calibration and the .tflite stamp are both checked against it
    calibration, rule = read_calibration(metadata, model_path, model_sha)
    if runtime == "tflite":
        classifier = _from_fresh_tflite(model_path, model_sha, metadata, pool_size, num_threads, calibration, rule)
        if classifier is not None:
            return classifier
    model = load_keras_model(model_path)
    check_outputs(model.outputs[0].shape[-1], labels)
    if runtime == "tflite":
        call = _fast_call(model, model_path, pool_size, num_threads)
        if call is not None:
            return Classifier(metadata=metadata, path=model_path, sha256=model_sha, _call=call, runtime="tflite",
                              calibration=calibration, rule=rule, _model=model)
    return Classifier(metadata=metadata, path=model_path, sha256=model_sha, _call=_compile_call(model),
                      calibration=calibration, rule=rule, _model=model)


def load_keras_model(model_path: Path):
    from hematovision.network import load_model  # heavy (Keras): imported only when the model itself is needed

    try:
        return load_model(model_path)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same to a user
        raise ModelLoadError(f"Could not load the model {model_path}: {exc}") from exc


def check_outputs(outputs: int, labels: list) -> None:
    if outputs != len(labels):
        raise ModelLoadError(f"The model has {outputs} outputs but its metadata lists {len(labels)} labels.")


def _from_fresh_tflite(model_path: Path, model_sha: str, metadata: dict, pool_size: int, num_threads: int | None,
                       calibration: Temperature, rule: AbstentionRule) -> Classifier | None:
    """Serve from the exported .tflite when its stamp says it was derived from this very .h5 (sha256): no
    TensorFlow needed. None (logged) when it is missing, stale or unusable: then the .h5 is loaded and converted."""
    content = fast_runtime.read_fresh_tflite(model_path, model_sha)
    if content is None:
        return None
    try:
        pool = fast_runtime.InterpreterPool(content, size=pool_size, num_threads=num_threads)
        probabilities, _ = pool(np.zeros((1, *IMAGE_SIZE, 3), np.float32))  # also warms the interpreter up
    except Exception as exc:  # interpreter errors come in many types
        logging.getLogger(__name__).warning("Exported TFLite model unusable, converting the .h5 again: %s", exc)
        return None
    check_outputs(probabilities.shape[-1], metadata["labels"])
    return Classifier(metadata=metadata, path=model_path, sha256=model_sha, _call=pool, runtime="tflite",
                      calibration=calibration, rule=rule)


def read_calibration(metadata: dict, model_path: Path, model_sha: str) -> tuple[Temperature, AbstentionRule]:
    """The temperature and abstention rule stored with this model, when they were fitted on this very .h5
    (their `model_sha256`); a model without them, or with stale ones (logged), gets T = 1 and the plain
    DEFAULT_MIN_PROBABILITY threshold. Damaged parameters stop the load: there is no silent fallback for them.
    `model_sha`: the .h5's sha256."""
    calibration, abstention = metadata.get("calibration"), metadata.get("abstention")
    temperature, rule = Temperature(), AbstentionRule(min_probability=DEFAULT_MIN_PROBABILITY)
    if not calibration and not abstention:
        return temperature, rule
    log = logging.getLogger(__name__)
    if calibration:
        if calibration.get("model_sha256") not in (None, model_sha):
            log.warning("Ignoring the calibration in %s: it was fitted on another %s (retrain it with "
                        "training/train.py)", metadata_path_for(model_path).name, model_path.name)
        else:
            temperature = Temperature(base=float(calibration["temperature"]),
                                      slope=float(calibration.get("distance_slope", 0.0)),
                                      centre=float(calibration.get("distance_centre", 0.0)))
    if abstention:
        if abstention.get("model_sha256") not in (None, model_sha):
            log.warning("Ignoring the abstention rule in %s: it was fitted on another %s (retrain it "
                        "with training/train.py)", metadata_path_for(model_path).name, model_path.name)
            return temperature, rule
        density = other = None
        other_types = abstention.get("other_types") or {}
        if abstention.get("file"):
            density_path = model_path.parent / Path(abstention["file"]).name
            try:
                density = FeatureDensity.load(density_path)
                if other_types:
                    other = load_other_types(density_path, other_types.get("types", ()))
                    if other is None:
                        raise KeyError("other_weights")
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"The abstention parameters {density_path} are missing or unreadable: {exc}. "
                                     "Retrain it with training/train.py, or remove 'abstention' from the "
                                     "metadata.") from exc
        rule = AbstentionRule(
            min_probability=abstention.get("min_probability"),
            max_distance=abstention.get("max_distance") if density is not None else None,
            density=density,
            other=other,
            max_other_score=other_types.get("max_score") if other is not None else None,
        )
    return temperature, rule


def _fast_call(model, model_path: Path, pool_size: int, num_threads: int | None):
    """The TFLite interpreter pool for this .h5, or None (logged) when it cannot be had: then the
    tf.function path serves the same model, only slower."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    try:
        content = fast_runtime.load_or_convert(model_path, model)
        pool = fast_runtime.InterpreterPool(content, size=pool_size, num_threads=num_threads)
    except Exception as exc:  # conversion or interpreter errors come in many types
        logging.getLogger(__name__).warning("TFLite runtime unavailable, using tf.function: %s", exc)
        return None
    return pool


def _compile_call(model):
    """A traced inference function: for one image at a time it is much faster than model.predict() or an eager
    model(x) call, which pay for their set-up on every call (bench/bench_predict.py measures all three)."""
    import keras

    both = with_features(model)
    if keras.backend.backend() != "tensorflow":
        return lambda x: tuple(keras.ops.convert_to_numpy(out) for out in both(x, training=False))
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SIZE, 3], tf.float32)], reduce_retracing=True)
    def serve(x):
        return both(x, training=False)

    def call(x):
        probabilities, features = serve(x)
        return probabilities.numpy(), features.numpy()

    return call


# An absolute path of the machine the model was trained on (/tmp/..., /home/..., C:\...), not a URL or a fraction.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:/|~/|[A-Za-z]:[\\/])[^\s'\",;()\[\]]+")


def public_metadata(value):
    """The metadata (or any part of it) with each absolute path of the training machine cut to its last part:
    `--data-dir /tmp/kaggle` becomes `--data-dir kaggle`. Relative paths (of this repository) stay."""
    if isinstance(value, dict):
        return {key: public_metadata(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_metadata(item) for item in value]
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: re.split(r"[\\/]", match.group(0).rstrip("\\/"))[-1], value)
    return value
