"""training/refit_head.py: the LDA refit is written as the model's own Dense layer, exactly (tiny real Keras model)."""

from __future__ import annotations

import numpy as np
import pytest

from training import refit_head


def pooled_features(model, images: np.ndarray) -> np.ndarray:
    import keras

    return np.asarray(keras.Model(model.inputs, model.layers[-1].input).predict_on_batch(images.astype(np.float32)))


def coloured_cells(n_per_class: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for k in range(classes):
        base = np.array([40 + 50 * k, 200 - 40 * k, 120], np.float64)
        for _ in range(n_per_class):
            images.append(np.clip(base + rng.normal(0, 25, (224, 224, 3)), 0, 255).astype(np.uint8))
            targets.append(k)
    return np.stack(images), np.asarray(targets)


def test_the_refitted_model_gives_the_discriminant_probabilities(tiny_model_path):
    """After set_head, the Keras model's softmax output is scikit-learn's LDA predict_proba of its pooled features,
    on images the LDA was not fitted on: the kernel/bias conversion and the layer write are both right."""
    import keras

    model = keras.models.load_model(tiny_model_path, compile=False)
    classes = model.outputs[0].shape[-1]
    x_train, y_train = coloured_cells(12, classes, seed=1)
    x_check, _ = coloured_cells(3, classes, seed=2)
    lda = refit_head.fit_discriminant(pooled_features(model, x_train), y_train, classes)
    before = np.asarray(model.predict_on_batch(x_check.astype(np.float32)))
    refit_head.set_head(model, *refit_head.linear_weights(lda))
    after = np.asarray(model.predict_on_batch(x_check.astype(np.float32)))
    expected = lda.predict_proba(pooled_features(model, x_check))
    np.testing.assert_allclose(after, expected, atol=1e-5)
    assert not np.allclose(before, after, atol=1e-3)  # the head really changed


def test_two_classes_become_two_scores():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (20, 3)), rng.normal(2, 1, (20, 3))])
    y = np.repeat([0, 1], 20)
    lda = refit_head.fit_discriminant(x, y, 2)
    kernel, bias = refit_head.linear_weights(lda)
    scores = x @ kernel + bias
    probabilities = np.exp(scores - scores.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert kernel.shape == (3, 2)
    np.testing.assert_allclose(probabilities, lda.predict_proba(x), atol=1e-8)


def test_a_class_without_training_images_is_refused():
    with pytest.raises(ValueError, match="every class"):
        refit_head.fit_discriminant(np.zeros((4, 3)), np.array([0, 0, 1, 1]), 3)


def test_validation_accuracy_is_reported_per_lab():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    figures = refit_head.accuracy_by_domain(probabilities, np.array([0, 1, 1, 1]), np.array(["a", "a", "b", "b"]))
    assert figures["by_domain"] == {"a": 1.0, "b": 0.5} and figures["mean_over_domains"] == 0.75
    assert figures["accuracy"] == 0.75 and figures["n"] == 4
