"""A fast CPU runtime derived from the Keras .h5: a float32 TFLite model run by the LiteRT interpreter.

The .h5 stays the source of truth. `export_tflite` converts it and writes `<model>.tflite` next to it, with
`<model>.tflite.json` recording the sha256 of the .h5 it came from (and of the .tflite itself). At start-up
`load_or_convert` uses the .tflite only when both hashes still match; otherwise it converts again from the .h5
(which needs TensorFlow and is the slow part of a start-up) and tries to rewrite the pair, so a stale file is
never used.

The .tflite has two outputs, the probabilities and the pooled penultimate features (for the abstention rule,
hematovision.abstention); the features are an intermediate tensor of the same graph, so they cost nothing. A
.tflite exported before it had them (its stamp lists no `outputs`) counts as stale. `with_features` builds that
two-output graph; the tf.function runtime (hematovision.classifier) serves the same one.

    python -m hematovision.fast_runtime [model/blood_cell_model.h5]     # the export step

An interpreter is not thread-safe: `InterpreterPool` keeps a few and lends each to one caller at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# A batch runs as one invoke per image on an interpreter allocated for batch 1, never resized: on a CPU, one
# invoke of a batch of 8 was slower than 8 invokes of one image, and each resize_tensor_input + allocate_tensors
# (XNNPACK prepares the graph again) costs as much as running a batch.


OUTPUTS = ["probabilities", "features"]  # the exported graph's outputs, in this order (recorded in the stamp)
SUFFIX = ".tflite"  # <model>.tflite next to <model>.h5, and its stamp <model>.tflite.json


class FastRuntimeError(RuntimeError):
    """The fast runtime could not be built or loaded."""


def tflite_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(SUFFIX)


def stamp_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(SUFFIX + ".json")


def sha256_of(data_or_path: bytes | str | Path) -> str:
    if isinstance(data_or_path, bytes):
        return hashlib.sha256(data_or_path).hexdigest()
    digest = hashlib.sha256()
    with open(data_or_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_keras_model(model) -> bytes:
    """Keras model -> float32 TFLite flatbuffer (no quantisation: probabilities must match the .h5). Pass
    `with_features(model)` to get the probabilities and the features."""
    import tensorflow as tf

    printout = io.StringIO()  # Keras's export lists every tensor (hundreds of lines): shown only on failure
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printout):
            warnings.simplefilter("ignore")  # converter chatter
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            converter.optimizations = []
            return bytes(converter.convert())
    except Exception:
        sys.stderr.write(printout.getvalue())
        raise


def read_fresh_tflite(model_path: str | Path, source_sha: str | None = None) -> bytes | None:
    """The exported .tflite bytes when they were derived from this exact .h5, else None (missing or stale)."""
    tflite_file, stamp_file = tflite_path_for(model_path), stamp_path_for(model_path)
    try:
        stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
        content = tflite_file.read_bytes()
    except (OSError, ValueError):
        return None
    source_sha = source_sha or sha256_of(model_path)
    if stamp.get("source_sha256") != source_sha or stamp.get("tflite_sha256") != sha256_of(content):
        log.warning("%s is stale (made from another %s); deriving it again", tflite_file, Path(model_path).name)
        return None
    if stamp.get("outputs") != OUTPUTS:
        log.warning("%s is stale (made without the outputs %s); deriving it again", tflite_file, OUTPUTS)
        return None
    return content


def write_tflite(model_path: str | Path, content: bytes, source_sha: str) -> Path:
    """Write `<model>.tflite` and its stamp atomically (temp file + rename), the .tflite first."""
    import tensorflow as tf

    tflite_file, stamp_file = tflite_path_for(model_path), stamp_path_for(model_path)
    stamp = {
        "source": Path(model_path).name,
        "source_sha256": source_sha,
        "tflite_sha256": sha256_of(content),
        "outputs": OUTPUTS,
        "tensorflow": tf.__version__,
        "converter": "tf.lite.TFLiteConverter.from_keras_model, float32, no optimizations",
    }
    for path, data in ((tflite_file, content), (stamp_file, (json.dumps(stamp, indent=2) + "\n").encode())):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the model files are meant to be readable
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return tflite_file


def feature_output(model):
    """The pooled penultimate features: the output of the layer named "pool" (hematovision.network), else the
    input of the last (classifying) layer."""
    names = [layer.name for layer in model.layers]
    if "pool" in names:
        return model.get_layer("pool").output
    return model.layers[-1].input


def with_features(model):
    """The graph that is served and exported: the model with its pooled features as a second output (OUTPUTS)."""
    import keras

    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # a list of one makes Keras warn per call
    return keras.Model(inputs, [model.outputs[0], feature_output(model)], name=f"{model.name}_with_features")


def load_or_convert(model_path: str | Path, model, *, write: bool = True) -> bytes:
    """The .tflite bytes for this .h5: the exported file when fresh, else a new conversion (written back
    next to the .h5 when `write` and the folder allows it)."""
    source_sha = sha256_of(model_path)
    content = read_fresh_tflite(model_path, source_sha)
    if content is not None:
        return content
    content = convert_keras_model(with_features(model))
    if write:
        try:
            write_tflite(model_path, content, source_sha)
        except OSError as exc:  # a read-only model folder is fine: convert again at the next start
            log.warning("Could not write %s: %s", tflite_path_for(model_path), exc)
    return content


def make_interpreter(content: bytes, num_threads: int | None = None):
    """A LiteRT interpreter (ai-edge-litert); TensorFlow's own tf.lite.Interpreter (deprecated in TF 2.20+,
    still present in 2.21) when ai-edge-litert is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_content=content, num_threads=num_threads)


def output_order(details: list[dict]) -> list[int]:
    """Tensor indices of the outputs in the Keras model's order. The converter names them `<graph>:<position>`
    (e.g. StatefulPartitionedCall_1:1 for the second output) but does not list them in that order."""
    if len(details) == 1:
        return [details[0]["index"]]
    try:
        ranked = sorted(details, key=lambda d: int(d["name"].rsplit(":", 1)[1]))
    except (IndexError, ValueError) as exc:
        raise FastRuntimeError(f"Cannot tell the outputs apart by name: {[d['name'] for d in details]}") from exc
    return [d["index"] for d in ranked]


class _Runner:
    """One interpreter, allocated once for one image; a batch is run image by image (see the note above)."""

    def __init__(self, content: bytes, num_threads: int | None):
        self.interpreter = make_interpreter(content, num_threads)
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_indices = output_order(self.interpreter.get_output_details())
        input_shape = list(self.interpreter.get_input_details()[0]["shape"][1:])
        self.interpreter.resize_tensor_input(self.input_index, [1, *input_shape])  # the export's batch is dynamic
        self.interpreter.allocate_tensors()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, features); features is None for a .tflite with one output."""
        outputs: list[list[np.ndarray]] = [[] for _ in self.output_indices]
        for image in np.asarray(batch, dtype=np.float32):
            self.interpreter.set_tensor(self.input_index, np.ascontiguousarray(image[None]))
            self.interpreter.invoke()
            for collected, index in zip(outputs, self.output_indices, strict=True):
                collected.append(self.interpreter.get_tensor(index)[0].copy())
        stacked = [np.stack(collected) for collected in outputs]
        return stacked[0], (stacked[1] if len(stacked) > 1 else None)


class InterpreterPool:
    """Up to `size` interpreters of one model, each used by one thread at a time; a caller waits for a free one.
    Created lazily, so an idle server holds one."""

    def __init__(self, content: bytes, size: int = 2, num_threads: int | None = None):
        self.content = content
        self.size = max(1, size)
        self.num_threads = num_threads or os.cpu_count() or 1
        self._free: queue.LifoQueue[_Runner] = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()
        self._free.put(self._new_runner())  # fail now, at start-up, if the model cannot be loaded

    def _new_runner(self) -> _Runner:
        runner = _Runner(self.content, self.num_threads)
        self._created += 1
        return runner

    def _take(self) -> _Runner:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._created < self.size:
                return self._new_runner()
        return self._free.get()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, features) of a batch."""
        runner = self._take()
        try:
            return runner.run(batch)
        finally:
            self._free.put(runner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the .h5 model as a float32 .tflite next to it.")
    parser.add_argument("model", nargs="?", default="model/blood_cell_model.h5", type=Path)
    parser.add_argument("--check", action="store_true", help="only report whether the .tflite is fresh (exit 1 if not)")
    args = parser.parse_args(argv)
    if args.check:
        fresh = read_fresh_tflite(args.model) is not None
        print(f"{tflite_path_for(args.model)}: {'fresh' if fresh else 'missing or stale'}")
        return 0 if fresh else 1
    from hematovision.network import load_model

    model = load_model(args.model)
    content = convert_keras_model(with_features(model))
    path = write_tflite(args.model, content, sha256_of(args.model))
    print(f"wrote {path} ({len(content) / 1e6:.1f} MB) and {stamp_path_for(args.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
