"""The TFLite runtime derived from the .h5 gives the Keras model's probabilities, is re-derived when stale,
and is safe to share between threads."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app import create_app
from hematovision import fast_runtime
from hematovision.classifier import ModelLoadError, load_classifier

TOLERANCE = 1e-4


def random_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)


def keras_probabilities(model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model(batch.astype(np.float32), training=False))


@pytest.fixture
def model_copy(tiny_model_path, tmp_path):
    """A private copy of the tiny model (with its metadata), so stamps written here touch no other test."""
    path = tmp_path / "model.h5"
    shutil.copy(tiny_model_path, path)
    shutil.copy(tiny_model_path.with_suffix(".json"), path.with_suffix(".json"))
    return path


@pytest.fixture(scope="module")
def fast_classifier(tiny_model_path):
    return load_classifier(tiny_model_path)


@pytest.mark.parametrize("n", [1, 3, 1, 37])
def test_tflite_matches_keras_for_batch_sizes(fast_classifier, n):
    assert fast_classifier.runtime == "tflite"
    batch = random_batch(n, seed=n)
    fast = fast_classifier.predict(batch)
    assert fast.shape == (n, 4)
    np.testing.assert_allclose(fast, keras_probabilities(fast_classifier.model, batch), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(fast.sum(axis=1), 1.0, atol=1e-5)


def test_single_image_without_batch_axis(fast_classifier):
    image = random_batch(1)[0]
    np.testing.assert_allclose(fast_classifier.predict(image), fast_classifier.predict(image[None]), atol=1e-7)


def test_tf_function_runtime_is_still_available_and_agrees(tiny_model_path, fast_classifier):
    slow = load_classifier(tiny_model_path, runtime="tf.function")
    assert slow.runtime == "tf.function"
    batch = random_batch(4, seed=7)
    np.testing.assert_allclose(slow.predict(batch), fast_classifier.predict(batch), atol=TOLERANCE, rtol=0)


def test_unknown_runtime_is_refused(tiny_model_path):
    with pytest.raises(ModelLoadError, match="Unknown inference runtime"):
        load_classifier(tiny_model_path, runtime="onnx")


def test_app_runtime_comes_from_config(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "INFERENCE_RUNTIME": "tf.function"})
    assert app.extensions["hematovision"].runtime == "tf.function"
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)})
    assert app.extensions["hematovision"].runtime == "tflite"


def test_export_writes_tflite_with_the_h5_hash(model_copy, capsys):
    assert fast_runtime.main([str(model_copy), "--check"]) == 1
    assert fast_runtime.main([str(model_copy)]) == 0
    stamp = json.loads(fast_runtime.stamp_path_for(model_copy).read_text())
    assert stamp["source_sha256"] == fast_runtime.sha256_of(model_copy)
    assert stamp["tflite_sha256"] == fast_runtime.sha256_of(fast_runtime.tflite_path_for(model_copy))
    assert fast_runtime.main([str(model_copy), "--check"]) == 0
    assert "fresh" in capsys.readouterr().out


def test_stale_tflite_is_detected_and_derived_again(model_copy, caplog):
    import keras

    first = load_classifier(model_copy)  # converts and writes the .tflite + stamp
    tflite = fast_runtime.tflite_path_for(model_copy)
    assert tflite.is_file() and fast_runtime.read_fresh_tflite(model_copy) is not None

    # Retrain (here: new weights) and save over the .h5: the old .tflite no longer matches it.
    model = keras.models.load_model(model_copy, compile=False)
    model.set_weights([w + np.float32(0.05) for w in model.get_weights()])
    model.save(model_copy)
    assert fast_runtime.read_fresh_tflite(model_copy) is None
    assert "stale" in caplog.text

    second = load_classifier(model_copy)
    batch = random_batch(2, seed=3)
    expected = keras_probabilities(model, batch)
    assert not np.allclose(first.predict(batch), expected, atol=TOLERANCE)
    np.testing.assert_allclose(second.predict(batch), expected, atol=TOLERANCE, rtol=0)
    assert fast_runtime.read_fresh_tflite(model_copy) is not None  # rewritten for the new .h5


def test_tampered_tflite_is_not_used(model_copy):
    load_classifier(model_copy)
    tflite = fast_runtime.tflite_path_for(model_copy)
    tflite.write_bytes(tflite.read_bytes()[:-10] + b"\0" * 10)
    assert fast_runtime.read_fresh_tflite(model_copy) is None


def test_read_only_model_folder_still_serves(model_copy, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(fast_runtime, "write_tflite", refuse)
    classifier = load_classifier(model_copy)
    assert classifier.runtime == "tflite"
    assert not fast_runtime.tflite_path_for(model_copy).exists()


def test_concurrent_callers_get_their_own_answers(tiny_model_path):
    classifier = load_classifier(tiny_model_path, pool_size=2)
    inputs = [random_batch(1 + i % 3, seed=100 + i) for i in range(24)]
    expected = [classifier.predict(batch) for batch in inputs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(classifier.predict, inputs))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert classifier._call._created <= 2


def test_tensorflow_interpreter_is_used_when_litert_is_absent(tiny_model_path, fast_classifier, monkeypatch):
    """requirements.txt may not list ai-edge-litert: TensorFlow's own (deprecated) interpreter then runs the
    same .tflite, its deprecation warning silenced."""
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # makes the import fail
    interpreter = fast_runtime.make_interpreter(fast_runtime.tflite_path_for(tiny_model_path).read_bytes())
    assert type(interpreter).__module__.startswith("tensorflow")
    classifier = load_classifier(tiny_model_path)
    batch = random_batch(2, seed=11)
    np.testing.assert_allclose(classifier.predict(batch), fast_classifier.predict(batch), atol=1e-6)


def test_test_time_views_average_the_flipped_and_turned_images(tiny_model_path):
    """With test_time_views set in the metadata, predict() is the mean over those symmetric views."""
    from hematovision.classifier import load_classifier, symmetric_views
    classifier = load_classifier(tiny_model_path, runtime="tf.function")
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x[:, :112, :, 0] = 255  # a strong asymmetric feature the tiny model's output depends on
    views = symmetric_views(x.astype(np.float32), 8)
    assert len(views) == 8 and len({v.tobytes() for v in views}) == 8  # all distinct for a non-symmetric image
    single = [classifier.predict(v) for v in views]
    classifier.metadata["test_time_views"] = 4
    np.testing.assert_allclose(classifier.predict(x), np.mean(single[:4], axis=0), atol=1e-6)
    classifier.metadata["test_time_views"] = 1
    np.testing.assert_allclose(classifier.predict(x), single[0], atol=1e-6)
    assert not np.allclose(single[0], np.mean(single[:4], axis=0))  # the views really differ for this model


def test_tflite_features_output_matches_keras(fast_classifier):
    """The .tflite's second output is the pooled penultimate features, as the Keras graph computes them."""
    from hematovision.fast_runtime import with_features

    batch = random_batch(3, seed=21)
    fast_probabilities, fast_features = fast_classifier.run(batch)
    keras_probabilities_, keras_features = with_features(fast_classifier.model)(batch.astype(np.float32),
                                                                                 training=False)
    assert fast_features.shape == (3, 8)  # the tiny model's 8 pooled channels
    np.testing.assert_allclose(fast_features, np.asarray(keras_features), atol=TOLERANCE, rtol=1e-5)
    np.testing.assert_allclose(fast_probabilities, np.asarray(keras_probabilities_), atol=TOLERANCE, rtol=0)


def test_tflite_without_the_features_output_counts_as_stale(model_copy, caplog):
    load_classifier(model_copy)  # writes the two-output .tflite
    stamp_file = fast_runtime.stamp_path_for(model_copy)
    stamp = json.loads(stamp_file.read_text())
    assert stamp["outputs"] == ["probabilities", "features"]
    del stamp["outputs"]  # as written before the features output existed
    stamp_file.write_text(json.dumps(stamp))
    assert fast_runtime.read_fresh_tflite(model_copy) is None
    assert "made without the outputs" in caplog.text


def test_fresh_tflite_serves_without_loading_keras_until_asked(model_copy):
    """With an exported .tflite made from this very .h5, start-up skips Keras (and TensorFlow); the Keras model
    is loaded on first use (Grad-CAM) and is the same network."""
    fast_runtime.main([str(model_copy)])
    classifier = load_classifier(model_copy)
    assert classifier.runtime == "tflite" and classifier._model is None
    batch = random_batch(2, seed=3)
    probabilities = classifier.run(batch)[0]
    assert classifier._model is None  # serving did not need it
    np.testing.assert_allclose(probabilities, keras_probabilities(classifier.model, batch), atol=TOLERANCE, rtol=0)
    assert classifier._model is not None


def test_fresh_tflite_with_the_wrong_number_of_labels_is_refused(model_copy):
    fast_runtime.main([str(model_copy)])
    meta_path = model_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["labels"] = meta["labels"][:3]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="3 labels"):
        load_classifier(model_copy)
