"""The colour standardisation inside the model: a lab's stain strength and contrast do not reach the network, and
the layer survives the .h5 round trip and the TFLite runtime the app serves with."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hematovision.classifier import load_classifier
from hematovision.network import ColourStandardisation

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def tiny_model(path, standardise: bool = True):
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    inputs = keras.Input((224, 224, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    if standardise:
        x = ColourStandardisation(name="colour_standardisation")(x)
    x = layers.Conv2D(8, 7, strides=4, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(len(LABELS), activation="softmax")(x))
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps({"labels": LABELS, "image_size": [224, 224]}), encoding="utf-8")
    return path


@pytest.mark.parametrize("per_channel", [True, False])
def test_each_image_leaves_the_layer_with_mean_0_and_the_set_spread(per_channel):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    images[1] = images[1] * [0.2, 0.5, 0.9] + [0.3, -0.1, 0.0]
    layer = ColourStandardisation(spread=0.5, per_channel=per_channel)
    out = np.asarray(layer(images))
    axes = (1, 2) if per_channel else (1, 2, 3)  # each channel on its own, or the three together
    np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-5)
    spread = images.std(axis=axes)  # epsilon keeps a flat image finite and shrinks a faint one a little
    np.testing.assert_allclose(out.std(axis=axes), 0.5 * spread / np.sqrt(spread**2 + layer.epsilon), rtol=1e-4)
    # One shift and one scale per image (and per channel only when asked): nothing else changes between pixels.
    centred = images - images.mean(axis=axes, keepdims=True)
    scale = out.std(axis=axes, keepdims=True) / centred.std(axis=axes, keepdims=True)
    np.testing.assert_allclose(out, centred * scale, atol=1e-5)


def test_a_stronger_or_paler_stain_gets_the_same_answer_through_the_served_runtime(tmp_path):
    classifier = load_classifier(tiny_model(tmp_path / "standardised.h5"))
    assert classifier.runtime == "tflite"
    rng = np.random.default_rng(1)
    image = rng.integers(60, 200, (224, 224, 3)).astype(np.float32)
    # Each channel scaled and shifted, as a stronger eosin or a paler haematoxylin does; no value is clipped.
    restained = image * [1.2, 0.8, 0.9] + [-20, 30, 10]
    batch = np.stack([image, restained]).round().astype(np.uint8)
    served = classifier.predict(batch)
    np.testing.assert_allclose(served[0], served[1], atol=2e-3)
    np.testing.assert_allclose(served, np.asarray(classifier.model(batch.astype(np.float32))), atol=1e-4)
    # The same weights without the layer answer the two differently: the test above does not pass by accident.
    moved = load_classifier(tiny_model(tmp_path / "plain.h5", standardise=False)).predict(batch)
    assert np.abs(moved[0] - moved[1]).max() > 10 * np.abs(served[0] - served[1]).max()
