"""Load the shipped model and its metadata once, and classify model-input arrays fast."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hematovision.imaging import IMAGE_SIZE

RUNTIMES = ("tflite", "tf.function")  # tflite: hematovision.fast_runtime; tf.function: the Keras graph itself
DEFAULT_RUNTIME = "tflite"


class ModelLoadError(RuntimeError):
    """The model or its metadata is missing or unreadable. There is no fallback."""


def metadata_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


@dataclass
class Classifier:
    """A Keras model plus the metadata that travels with it (labels, image size, figures)."""

    model: object
    metadata: dict
    path: Path
    _call: object = field(default=None, repr=False)
    runtime: str = "tf.function"  # the runtime actually in use (tflite falls back to tf.function, logged)

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, classes) float probabilities."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.shape[1:] != (*IMAGE_SIZE, 3):
            raise ValueError(f"expected (N, {IMAGE_SIZE[0]}, {IMAGE_SIZE[1]}, 3), got {batch.shape}")
        views = symmetric_views(batch.astype(np.float32), int(self.metadata.get("test_time_views", 1)))
        return np.mean([np.asarray(self._call(view), dtype=np.float64) for view in views], axis=0)


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
    import keras  # heavy: imported only when a model is actually loaded

    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same to a user
        raise ModelLoadError(f"Could not load the model {model_path}: {exc}") from exc
    outputs = model.outputs[0].shape[-1]
    if outputs != len(labels):
        raise ModelLoadError(f"The model has {outputs} outputs but its metadata lists {len(labels)} labels.")
    if runtime == "tflite":
        call = _fast_call(model, model_path, pool_size, num_threads)
        if call is not None:
            return Classifier(model=model, metadata=metadata, path=model_path, _call=call, runtime="tflite")
    return Classifier(model=model, metadata=metadata, path=model_path, _call=_compile_call(model))


def _fast_call(model, model_path: Path, pool_size: int, num_threads: int | None):
    """The TFLite interpreter pool for this .h5, or None (logged) when it cannot be had: then the
    tf.function path serves the same model, only slower."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    from hematovision import fast_runtime

    try:
        content = fast_runtime.load_or_convert(model_path, model)
        pool = fast_runtime.InterpreterPool(content, size=pool_size, num_threads=num_threads)
    except Exception as exc:  # conversion or interpreter errors come in many types
        logging.getLogger(__name__).warning("TFLite runtime unavailable, using tf.function: %s", exc)
        return None
    return pool


def _compile_call(model):
    """A traced inference function: model.predict() costs ~66 ms for one image and eager model(x) ~120 ms
    on a 2-core CPU; a tf.function of the same graph runs in a fraction of that."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda x: keras.ops.convert_to_numpy(model(x, training=False))
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SIZE, 3], tf.float32)], reduce_retracing=True)
    def serve(x):
        return model(x, training=False)

    return lambda x: serve(x).numpy()
