"""Calibration and the "uncertain / not a white blood cell" answer: the maths on hand-made numbers, and the whole
path (fit -> files next to the model -> Classifier -> API and page) with the tiny real Keras model."""

from __future__ import annotations

import html
import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from app import create_app
from hematovision import abstention
from hematovision.abstention import (
    LOW_CONFIDENCE,
    OTHER_TYPE,
    UNLIKE_TRAINING,
    AbstentionRule,
    FeatureDensity,
    Temperature,
    apply_temperature,
    expected_calibration_error,
    fit_distance_temperature,
    fit_feature_density,
    fit_other_types,
    fit_temperature,
    load_other_types,
    negative_log_likelihood,
    rule_arrays,
    threshold_for_rate,
)
from hematovision.classifier import abstention_path_for, load_classifier, metadata_path_for
from hematovision.fast_runtime import sha256_of
from tests.test_cells import FIELDS
from training import pipeline

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- temperature -------------------------------------------------------------------------------------


def test_temperature_divides_the_log_probabilities():
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    np.testing.assert_array_equal(apply_temperature(p, 1.0), p)
    by_hand = np.array([[0.7**0.5, 0.2**0.5, 0.1**0.5], [0.25**0.5, 0.25**0.5, 0.5**0.5]])  # exp(log p / 2)
    np.testing.assert_allclose(apply_temperature(p, 2.0), by_hand / by_hand.sum(axis=1, keepdims=True), rtol=1e-12)
    assert (apply_temperature(p, 3.0).argmax(axis=1) == p.argmax(axis=1)).all()  # the answer never changes
    np.testing.assert_allclose(apply_temperature(p, 1e6), 1 / 3, atol=1e-5)  # hot: uniform
    with pytest.raises(ValueError):
        apply_temperature(p, 0.0)


def test_fitted_temperature_undoes_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6000, 4))
    true_probs = softmax(logits / 2.5)  # the truth is 2.5 times less sure than the model says
    targets = np.array([rng.choice(4, p=row) for row in true_probs])
    temperature = fit_temperature(softmax(logits), targets)
    assert 2.2 < temperature < 2.8
    assert expected_calibration_error(apply_temperature(softmax(logits), temperature), targets) < \
        expected_calibration_error(softmax(logits), targets)


def test_distance_temperature_without_slope_is_one_temperature():
    p = softmax(np.random.default_rng(1).normal(0, 2, (5, 4)))
    plain = Temperature(base=2.0)
    np.testing.assert_allclose(plain.apply(p, np.arange(5.0)), apply_temperature(p, 2.0), rtol=1e-12)
    sloped = Temperature(base=2.0, slope=0.5, centre=10.0)
    assert sloped.values(None) == 2.0  # no distances (no fitted density): the base temperature
    np.testing.assert_allclose(sloped.values(np.array([10.0, 12.0])), [2.0, 2.0 * np.e], rtol=1e-12)
    assert np.isfinite(sloped.values(np.array([1e9]))).all()  # absurd distances stay finite
    assert (sloped.apply(p, np.full(5, 12.0)).argmax(1) == p.argmax(1)).all()  # the answer never changes


def test_distance_temperature_cools_unfamiliar_images_more():
    """Familiar images (small distance) are calibrated as they are; unfamiliar ones are 3x over-confident. One
    temperature can only split the difference; the distance form fixes both groups."""
    rng = np.random.default_rng(0)
    n = 4000
    logits = rng.normal(0, 3, (n, 4))
    far = np.arange(n) >= n // 2
    distances = np.where(far, 40.0, 20.0) + rng.normal(0, 1, n)
    truth = softmax(logits / np.where(far, 3.0, 1.0)[:, None])
    targets = np.array([rng.choice(4, p=row) for row in truth])
    probs = softmax(logits)
    single = fit_temperature(probs, targets)
    fitted = fit_distance_temperature(probs, targets, distances)
    assert fitted.slope > 0
    calibrated = fitted.apply(probs, distances)
    for group in (far, ~far):
        assert expected_calibration_error(calibrated[group], targets[group]) < expected_calibration_error(
            apply_temperature(probs, single)[group], targets[group])
    assert negative_log_likelihood(calibrated, targets) < negative_log_likelihood(apply_temperature(probs, single),
                                                                                 targets)


def test_expected_calibration_error_by_hand():
    # Two bins in use: confidence 0.9 (one right, one wrong: accuracy 0.5) and 0.6 (both right: accuracy 1).
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.2 + 0.2 = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    targets = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.4)
    # Perfect confidence that is always right: no error; a confidence of exactly 1 falls in the last bin.
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 0.0
    # Bins are (b/15, (b+1)/15]: 0.6 and 0.6 + 1e-9 fall in different bins (9/15 = 0.6 is an upper edge).
    probs = np.array([[0.6, 0.4], [0.6 + 1e-9, 0.4 - 1e-9]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.5 * 0.4 + 0.5 * 0.6)


# --- distance and decision ---------------------------------------------------------------------------


def two_clusters(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    targets = np.repeat([0, 1], n)
    features = means[targets] + rng.normal(0, [1.0, 1.0, 0.1], (2 * n, 3))  # little spread along the 3rd axis
    return features, targets


def test_distance_is_the_mahalanobis_distance_to_the_nearest_class():
    features, targets = two_clusters()
    density = fit_feature_density(features, targets, components=3)
    covariance = np.cov((features - np.array([[0, 0, 0], [5, 0, 0]])[targets]).T)
    point = np.array([[4.0, 1.0, 0.05]])
    delta = point[0] - features[targets == 1].mean(axis=0)
    expected = np.sqrt(delta @ np.linalg.inv(covariance) @ delta)
    assert density.distances(point)[0] == pytest.approx(expected, rel=0.01)
    # The least-variance direction matters most: 0.5 off along it is as far as 5 along the others.
    lowest = fit_feature_density(features, targets, components=1)
    assert lowest.distances(np.array([[0.0, 0.0, 0.5]]))[0] > 4
    assert lowest.distances(np.array([[0.0, 3.0, 0.0]]))[0] < 1


def test_density_round_trips_through_its_file(tmp_path):
    features, targets = two_clusters()
    density = fit_feature_density(features, targets, components=2)
    path = tmp_path / "ood.npz"
    path.write_bytes(density.to_bytes())
    loaded = FeatureDensity.load(path)
    probe = np.random.default_rng(1).normal(0, 3, (20, 3))
    np.testing.assert_array_equal(loaded.distances(probe), density.distances(probe))  # stored exactly as fitted


def test_decision_rule_on_hand_made_features():
    features, targets = two_clusters()
    rule = AbstentionRule(min_probability=0.5, max_distance=4.0,
                          density=fit_feature_density(features, targets, components=3))
    probe = np.array([[0.1, 0.2, 0.0], [5.0, -0.5, 0.02], [0.0, 0.0, 2.0], [50.0, 50.0, 0.0], [0.0, 0.0, 0.0]])
    probs = np.array([[0.9, 0.1], [0.45, 0.4], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])  # row 1: top 0.45 < 0.5
    distances = rule.distances(probe)
    assert rule.decide(probs, distances) == [None, LOW_CONFIDENCE, UNLIKE_TRAINING, UNLIKE_TRAINING, None]
    # Far away outranks low confidence; an override replaces the fitted probability threshold.
    assert rule.decide(np.array([[0.3, 0.3]]), rule.distances(np.array([[0.0, 0.0, 3.0]]))) == [UNLIKE_TRAINING]
    assert rule.decide(probs, distances, min_probability=0.0)[1] is None
    # Without a fitted density only the probability counts (0.6 is not below 0.6).
    assert AbstentionRule(min_probability=0.6).decide(probs, None) == [None, LOW_CONFIDENCE, None, None,
                                                                       LOW_CONFIDENCE]


def test_other_type_score_separates_the_types_it_learned_and_round_trips(tmp_path):
    known, targets = two_clusters()
    rng = np.random.default_rng(3)
    other = np.array([2.5, 3.0, 0.0]) + rng.normal(0, [1.0, 1.0, 0.1], (120, 3))  # a third kind, between the two
    score = fit_other_types(known, other, types=("BASOPHIL",))
    probe_known, _ = two_clusters(n=50, seed=7)
    probe_other = np.array([2.5, 3.0, 0.0]) + rng.normal(0, [1.0, 1.0, 0.1], (50, 3))
    assert np.median(score.scores(probe_other)) > 0 > np.median(score.scores(probe_known))
    assert (score.scores(probe_other) > np.percentile(score.scores(probe_known), 99)).mean() > 0.8
    density = fit_feature_density(known, targets, components=3)
    path = tmp_path / "ood.npz"
    path.write_bytes(rule_arrays(density, score))
    loaded = load_other_types(path, ("BASOPHIL",))
    assert loaded.types == ("BASOPHIL",) and loaded.bias == score.bias
    np.testing.assert_array_equal(loaded.scores(probe_other), score.scores(probe_other))
    np.testing.assert_array_equal(FeatureDensity.load(path).distances(probe_known), density.distances(probe_known))
    path.write_bytes(density.to_bytes())  # a rule without the other-type test
    assert load_other_types(path) is None


def test_decision_order_unlike_then_other_type_then_low_confidence():
    features, targets = two_clusters()
    rule = AbstentionRule(min_probability=0.5, max_distance=4.0,
                          density=fit_feature_density(features, targets, components=3),
                          other=fit_other_types(features, features[:10] + [0, 3, 0]), max_other_score=1.0)
    probs = np.array([[0.4, 0.35], [0.4, 0.35], [0.4, 0.35], [0.9, 0.1]])
    distances = np.array([5.0, 1.0, 1.0, 1.0])
    other_scores = np.array([2.0, 2.0, 0.0, 0.0])
    assert rule.decide(probs, distances, other_scores=other_scores) == [UNLIKE_TRAINING, OTHER_TYPE,
                                                                         LOW_CONFIDENCE, None]
    # Without scores (or without a threshold) the test is off.
    assert rule.decide(probs, distances) == [UNLIKE_TRAINING, LOW_CONFIDENCE, LOW_CONFIDENCE, None]
    assert not AbstentionRule(other=rule.other).tests_other


def test_threshold_flags_at_most_the_rate():
    scores = np.arange(1000, dtype=float)
    high = threshold_for_rate(scores, 0.01)
    assert (scores > high).sum() == 10
    low = threshold_for_rate(scores, 0.005, upper=False)
    assert (scores < low).sum() == 5
    assert (np.array([1.0, 1.0, 1.0]) > threshold_for_rate(np.array([1.0, 1.0, 1.0]), 0.5)).sum() == 0


# --- the whole path with the tiny real model ---------------------------------------------------------


def cell_like(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stand-ins for cells: each class a colour family with texture (as tests/test_training.py's folders)."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for k in range(len(LABELS)):
        base = np.array([40 + 50 * k, 200 - 40 * k, 120], np.float64)
        for _ in range(n_per_class):
            images.append(np.clip(base + rng.normal(0, 25, (224, 224, 3)), 0, 255).astype(np.uint8))
            targets.append(k)
    return np.stack(images), np.asarray(targets)


def not_cells() -> np.ndarray:
    rng = np.random.default_rng(9)
    blank_white = np.full((224, 224, 3), 255, np.uint8)
    blank_black = np.zeros((224, 224, 3), np.uint8)
    noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    stripes = np.zeros((224, 224, 3), np.uint8)
    stripes[:, ::8] = 255
    return np.stack([blank_white, blank_black, noise, stripes])


@pytest.fixture(scope="module")
def fitted_model(tiny_model_path, tmp_path_factory):
    """A copy of the tiny model with a temperature and an abstention rule fitted by training/pipeline.py's
    own functions on made-up "cells" (train and validation sets from different seeds)."""
    path = tmp_path_factory.mktemp("fitted") / "model.h5"
    shutil.copy(tiny_model_path, path)
    shutil.copy(tiny_model_path.with_suffix(".json"), path.with_suffix(".json"))
    classifier = load_classifier(path)
    x_train, y_train = cell_like(30, seed=1)
    x_val, y_val = cell_like(15, seed=2)
    _, train_features = classifier.run(x_train)
    val_raw, val_features = classifier.run(x_val)
    domains = np.array(["kaggle"] * len(y_val))
    fitted = pipeline.fit_calibration(train_features, y_train, val_raw, y_val, val_features, domains, components=512,
                                     distance_rate=0.0, confidence_rate=0.0)
    # The random tiny model gives every class about 1/4, so a probability threshold would be noise here: the
    # low-confidence rule is tested with hand-made numbers above.
    fitted["min_probability"] = 0.0
    record = {"validation_data": "made-up validation cells", "training_data": "made-up training cells",
              "rates": "none flagged", "command": "tests", "created": "now"}
    pipeline.write_calibration(path, fitted, record)
    return path


def test_fit_writes_parameters_that_travel_with_the_model(fitted_model):
    metadata = json.loads(metadata_path_for(fitted_model).read_text())
    npz = abstention_path_for(fitted_model)
    assert npz.is_file() and npz.stat().st_size < 3_000_000
    assert metadata["abstention"]["file"] == npz.name
    assert metadata["calibration"]["model_sha256"] == metadata["abstention"]["model_sha256"] == sha256_of(
        fitted_model)
    assert metadata["calibration"]["temperature"] > 0
    assert metadata["abstention"]["validation"]["all"]["flag_rate"] == 0.0  # rates of 0: no validation cell flagged


def test_classifier_applies_the_temperature_from_the_metadata(fitted_model):
    classifier = load_classifier(fitted_model)
    calibration = json.loads(metadata_path_for(fitted_model).read_text())["calibration"]
    assert classifier.temperature == calibration["temperature"] != 1.0
    assert classifier.calibration.slope == calibration["distance_slope"]
    x, _ = cell_like(2, seed=5)
    raw = np.asarray(classifier.model(x.astype(np.float32), training=False), dtype=np.float64)
    distances = classifier.assess(x).distances
    per_row = calibration["temperature"] * np.exp(calibration["distance_slope"]
                                                  * (distances - calibration["distance_centre"]))
    expected = softmax(np.log(raw) / per_row[:, None])
    np.testing.assert_allclose(classifier.predict(x), expected, atol=1e-5)
    np.testing.assert_allclose(classifier.assess(x).probabilities, expected, atol=1e-5)


def test_abstention_flags_blank_and_noise_but_not_cells(fitted_model):
    classifier = load_classifier(fitted_model)
    cells, _ = cell_like(10, seed=3)  # unseen cells of the same kind
    assert classifier.assess(cells).uncertain.mean() <= 0.1
    answer = classifier.assess(not_cells())
    assert answer.reasons == [UNLIKE_TRAINING] * 4
    assert (answer.distances > classifier.rule.max_distance).all()


def test_stale_parameters_are_ignored_with_a_warning(fitted_model, tmp_path, caplog):
    import keras

    path = tmp_path / "model.h5"
    for suffix in (".h5", ".json"):
        shutil.copy(fitted_model.with_suffix(suffix), path.with_suffix(suffix))
    shutil.copy(abstention_path_for(fitted_model), abstention_path_for(path))
    model = keras.models.load_model(path, compile=False)
    model.set_weights([w * np.float32(1.01) for w in model.get_weights()])  # "retrained"
    model.save(path)
    with caplog.at_level(logging.WARNING):
        classifier = load_classifier(path)
    assert "fitted on another" in caplog.text
    assert classifier.temperature == 1.0 and classifier.rule.density is None
    assert classifier.rule.min_probability == 0.6  # the plain default threshold


def test_missing_parameter_file_stops_the_load(fitted_model, tmp_path):
    from hematovision.classifier import ModelLoadError

    path = tmp_path / "model.h5"
    for suffix in (".h5", ".json"):
        shutil.copy(fitted_model.with_suffix(suffix), path.with_suffix(suffix))
    with pytest.raises(ModelLoadError, match="abstention parameters"):
        load_classifier(path)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_api_and_pages_answer_uncertain_with_the_reason(fitted_model):
    """Through the app's pipeline (white cells found first, each classified on its crop): a blank image and random
    noise (not a smear) have no white cell; a real smear's white cell is unlike every made-up training cell."""
    from hematovision.batch import NO_WHITE_CELL
    from tests.test_api import post_files
    from tests.test_batch import post_files as post_page_files

    app = create_app({"TESTING": True, "MODEL_PATH": str(fitted_model)})
    client = app.test_client()
    white, noise = png(not_cells()[0]), png(not_cells()[2])
    smear = (FIELDS / "bccd_00001_one_wbc.jpg").read_bytes()
    results = post_files(client, [("white.png", white), ("noise.png", noise), ("smear.jpg", smear)]).get_json()
    blank, grainy, unlike = results["results"]
    assert (blank["uncertain"], blank["reason"], blank["cells"]) == (True, NO_WHITE_CELL, [])
    assert (grainy["uncertain"], grainy["reason"], grainy["cells"]) == (True, NO_WHITE_CELL, [])
    assert (unlike["uncertain"], unlike["reason"]) == (True, UNLIKE_TRAINING)
    assert [cell["reason"] for cell in unlike["cells"]] == [UNLIKE_TRAINING]

    page = html.unescape(client.post("/predict", data={"file": (io.BytesIO(smear), "smear.jpg")},
                                     content_type="multipart/form-data").get_data(as_text=True))
    assert "Answer: Uncertain / not a white blood cell" in page and "not like any training cell" in page

    batch = html.unescape(post_page_files(client, [("white.png", white), ("smear.jpg", smear)]).get_data(as_text=True))
    assert "Uncertain cells (1)" in batch and "smear.jpg, cell 1: not like any training cell" in batch
    assert "No white blood cell found (1)" in batch
    assert "Over the 0 white cells" in batch


def test_abstention_module_has_no_web_or_keras_imports():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(abstention.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"flask", "werkzeug", "keras", "tensorflow"}


def purple_cells(n: int, seed: int) -> np.ndarray:
    """Stand-ins for a fifth type the model does not classify: another colour family, textured like cell_like's."""
    rng = np.random.default_rng(seed)
    return np.clip(np.array([150.0, 60.0, 200.0]) + rng.normal(0, 25, (n, 224, 224, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def other_type_model(tiny_model_path, tmp_path_factory):
    """The tiny model with the other-type test fitted by training/pipeline.py on made-up cells of a fifth type
    (and the distance test left off, so that the other-type test is what answers)."""
    path = tmp_path_factory.mktemp("other") / "model.h5"
    shutil.copy(tiny_model_path, path)
    shutil.copy(tiny_model_path.with_suffix(".json"), path.with_suffix(".json"))
    classifier = load_classifier(path)
    (x_train, y_train), (x_val, y_val) = cell_like(30, seed=1), cell_like(15, seed=2)
    _, train_features = classifier.run(x_train)
    val_raw, val_features = classifier.run(x_val)
    fitted = pipeline.fit_calibration(
        train_features, y_train, val_raw, y_val, val_features, np.array(["lisc"] * len(y_val)),
        distance_rate=0.0, confidence_rate=0.0, other_rate=0.0, other_types=("BASOPHIL",),
        other_train=classifier.run(purple_cells(30, seed=1))[1],
        other_validation=classifier.run(purple_cells(10, seed=2))[1])
    fitted["min_probability"], fitted["max_distance"] = 0.0, None
    pipeline.write_calibration(path, fitted, {"validation_data": "made-up validation cells",
                                              "training_data": "made-up training cells", "rates": "none flagged",
                                              "other_data": "made-up purple cells"})
    return path


def test_other_type_test_travels_with_the_model_and_answers(other_type_model):
    metadata = json.loads(metadata_path_for(other_type_model).read_text())
    other = metadata["abstention"]["other_types"]
    assert other["types"] == ["BASOPHIL"] and other["validation_n"] == 10 and other["fitted_on"]
    assert metadata["abstention"]["validation"]["all"]["flag_rate_other_type"] == 0.0  # rate 0: no known cell
    classifier = load_classifier(other_type_model)
    assert classifier.rule.tests_other and not classifier.rule.tests_distance
    assert classifier.rule.max_other_score == other["max_score"]
    answer = classifier.assess(purple_cells(10, seed=3))
    assert answer.reasons.count(OTHER_TYPE) >= 8
    assert (answer.other_scores > classifier.rule.max_other_score).sum() == answer.reasons.count(OTHER_TYPE)
    known, _ = cell_like(10, seed=3)
    assert classifier.assess(known).uncertain.mean() <= 0.1


def test_model_card_says_which_types_it_flags(other_type_model, tiny_model_path):
    page = create_app({"TESTING": True, "MODEL_PATH": str(other_type_model)}).test_client().get("/model")
    text = " ".join(html.unescape(page.get_data(as_text=True)).split())
    assert page.status_code == 200 and "a type the model does not classify (basophil)" in text
    plain = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)}).test_client().get("/model")
    assert "does not classify (basophil)" not in plain.get_data(as_text=True)
