"""training/adapt.py: its refusals (one line on stderr, exit 2, nothing at --out), the batch-norm statistics step,
and a whole adaptation of the tiny test model that the app's classifier then loads and answers with."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training import adapt

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
NUCLEUS = [(110, 70, 190), (70, 40, 150), (150, 90, 200), (120, 50, 160)]


def drawn_field(rng: np.random.Generator, k: int, cells: int = 1, size=(320, 240)) -> Image.Image:
    """A smear field the white-cell detector reads: red cells on a pale background and `cells` white cells, each
    a pale cytoplasm disc around k + 1 purple nucleus lobes (a colour per class, so there is something to learn)."""
    image = Image.new("RGB", size, (236, 226, 214))
    draw = ImageDraw.Draw(image)
    for x, y in rng.integers(0, size, (25, 2)):
        draw.ellipse([x - 14, y - 14, x + 14, y + 14], fill=(214, 140, 150))
    for c in range(cells):
        x, y = np.array([size[0] // 2 + 100 * c - 50 * (cells - 1), size[1] // 2]) + rng.integers(-10, 10, 2)
        draw.ellipse([x - 30, y - 30, x + 30, y + 30], fill=(200, 170, 210))
        for j in range(k + 1):
            dx = (j - k / 2) * 10
            draw.ellipse([x + dx - 12, y - 14, x + dx + 12, y + 14], fill=NUCLEUS[k])
    return image


def write_lab(root, per_class=3, skip=(), counts=None):
    """One folder per class (lower case: matching is case-insensitive); the first image of each has two cells."""
    rng = np.random.default_rng(0)
    for k, label in enumerate(LABELS):
        if label in skip:
            continue
        folder = root / label.lower()
        folder.mkdir(parents=True)
        for i in range((counts or {}).get(label, per_class)):
            drawn_field(rng, k, cells=2 if i == 0 else 1).save(folder / f"cell_{i}.png")
    return root


def run(argv, capsys):
    code = adapt.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(tmp_path, capsys, argv, *words):
    out = tmp_path / "out" / "lab.h5"
    code, _, err = run([*argv, "--out", out], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("adapt.py: ")
    assert "Traceback" not in err
    for word in words:
        assert word in err
    assert not out.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))  # no staging folder or half-written file left


def test_refuses_a_missing_class_folder(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab", skip=("MONOCYTE",))
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "MONOCYTE")


def test_refuses_an_empty_class_folder(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab", counts={"NEUTROPHIL": 0})
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "neutrophil", "no image")


def test_refuses_an_unknown_folder(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab")
    (data / "Basophil").mkdir()
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "Basophil", "EOSINOPHIL")


def test_refuses_fewer_than_two_images_of_a_class(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab", counts={"LYMPHOCYTE": 1})
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "lymphocyte", "at least 2")


def test_refuses_a_class_left_with_fewer_than_two_white_cells(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab", counts={"EOSINOPHIL": 2})
    Image.new("RGB", (320, 240), (236, 226, 214)).save(data / "eosinophil" / "cell_1.png")  # no cell in it
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "EOSINOPHIL")


def test_refuses_an_unreadable_image(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab")
    (data / "monocyte" / "broken.jpg").write_bytes(b"not a picture at all")
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "unreadable", "broken.jpg")


def test_refuses_an_output_that_exists(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab")
    out = tmp_path / "out" / "lab.h5"
    out.parent.mkdir()
    out.write_bytes(b"someone's model")
    code, _, err = run(["--data-dir", data, "--base", tiny_model_path, "--out", out], capsys)
    assert code == 2 and "exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"someone's model"
    assert sorted(p.name for p in out.parent.iterdir()) == ["lab.h5"]
    other = out.with_name("other.h5")
    other.with_suffix(".json").write_text("{}")  # a file the run would replace beside --out
    code, _, err = run(["--data-dir", data, "--base", tiny_model_path, "--out", other], capsys)
    assert code == 2 and "other.json exists" in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["lab.h5", "other.json"]


def test_refuses_a_missing_data_folder_and_too_few_unlabelled_images(tmp_path, capsys, tiny_model_path):
    assert_refused(tmp_path, capsys, ["--data-dir", tmp_path / "nowhere", "--base", tiny_model_path], "not found")
    few = tmp_path / "few"
    few.mkdir()
    drawn_field(np.random.default_rng(1), 0).save(few / "a.png")
    assert_refused(tmp_path, capsys, ["--unlabelled", few, "--base", tiny_model_path], "at least 4")


def test_needs_some_images(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        adapt.main(["--out", str(tmp_path / "lab.h5")])
    assert stopped.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_statistics_mix_the_labs_with_the_models_own():
    """A frozen batch-norm layer (as train.py leaves them) still takes the lab's statistics, mixed as asked."""
    import keras
    from keras import layers

    inputs = keras.Input((4, 4, 3))
    x = layers.BatchNormalization(name="bn")(inputs)
    outputs = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.trainable = False
    bn.moving_mean.assign(np.full(3, 10.0, np.float32))
    bn.moving_variance.assign(np.full(3, 4.0, np.float32))
    crops = np.random.default_rng(0).normal([1.0, 2.0, 3.0], 1.0, (40, 4, 4, 3)).astype(np.float32)
    assert adapt.adapt_statistics(model, crops, mix=0.5, batch_size=16, progress=False) == 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * 10.0 + 0.5 * crops.mean(axis=(0, 1, 2)), atol=0.05)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.5 * 4.0 + 0.5 * crops.var(axis=(0, 1, 2)), atol=0.15)
    assert bn.trainable is False and bn.momentum == 0.99  # put back as they were


def first_conv(model_path) -> str:
    """The name of the tiny model's convolution (the MobileNetV2 layer adapt.py fine-tunes from is not there)."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    return next(layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D))


def test_fine_tune_trains_from_the_named_layer_on_and_never_batch_norm():
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, name="early")(layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    x = layers.BatchNormalization(name="bn")(layers.Conv2D(4, 3, name="late")(x))
    outputs = layers.Dense(4, activation="softmax", name="head")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers if layer.weights}
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    assert adapt.fine_tune(model, crops, np.arange(6) % 4, steps=4, first_layer="late", learning_rate=0.05,
                           batch_size=4, progress=False) == 2  # late and head; bn has weights but stays frozen
    after = {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
    for name in ("early", "bn"):
        for old, new in zip(before[name], after[name], strict=True):
            np.testing.assert_array_equal(old, new)
    for name in ("late", "head"):
        assert not np.allclose(before[name][0], after[name][0])
    assert not any(layer.trainable for layer in model.layers if layer.weights)  # frozen again afterwards


def test_fine_tune_gives_one_result_per_seed_however_often_the_model_was_adapted():
    """The measurement scripts adapt one loaded base many times: its dropout must not carry on from the last one."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, name="conv")(layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    x = layers.Dropout(0.5, name="drop")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, layers.Dense(4, activation="softmax", name="head")(x))
    start = [w.copy() for w in model.get_weights()]
    crops = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    results = []
    for seed in (7, 7, 8):
        model.set_weights(start)
        adapt.fine_tune(model, crops, np.arange(8) % 4, steps=3, first_layer="conv", learning_rate=0.05,
                        batch_size=4, seed=seed, progress=False)
        results.append(model.get_weights())
    for first, again in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(first, again)
    assert any(not np.array_equal(a, b) for a, b in zip(results[0], results[2], strict=True))


def test_a_base_without_the_layer_to_fine_tune_from_is_refused(tmp_path, capsys, tiny_model_path):
    data = write_lab(tmp_path / "lab", per_class=2)
    assert_refused(tmp_path, capsys, ["--data-dir", data, "--base", tiny_model_path], "block_10_expand",
                   "--fine-tune-steps 0")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def base_with_rule(tmp_path, tiny_model_path):
    """The tiny model with a calibration and a fitted "uncertain" rule (feature density), as a shipped model has."""
    import shutil

    from hematovision import abstention
    from hematovision.classifier import load_classifier
    from hematovision.imaging import prepare_field
    from training import pipeline

    base = tmp_path / "base" / "tiny.h5"
    base.parent.mkdir()
    shutil.copy(tiny_model_path, base)
    shutil.copy(tiny_model_path.with_suffix(".json"), base.with_suffix(".json"))
    rng = np.random.default_rng(5)
    fields = [(drawn_field(rng, k), k) for k in range(4) for _ in range(3)]
    crops = np.stack([prepare_field(_png(f)).primary_crop for f, _ in fields])
    targets = np.array([k for _, k in fields])
    _, features = load_classifier(base, runtime="tf.function").run(crops)
    density = abstention.fit_feature_density(features, targets, components=4)
    distances = density.distances(features)
    fitted = {"temperature": abstention.Temperature(base=1.5), "single_temperature": 1.5, "density": density,
              "max_distance": float(distances.max()), "min_probability": 0.3, "validation": {"n": len(targets)}}
    pipeline.write_calibration(base, fitted, {"validation_data": "drawn", "training_data": "drawn", "rates": "-"})
    return base


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_adapting_the_tiny_model_writes_a_model_the_app_serves(tmp_path, capsys, base_with_rule):
    from hematovision.classifier import load_classifier
    from hematovision.fast_runtime import sha256_of
    from hematovision.imaging import prepare_field

    data = write_lab(tmp_path / "my_lab", per_class=3)
    out = tmp_path / "out" / "lab.h5"
    tuned = ["--fine-tune-from", first_conv(base_with_rule), "--fine-tune-steps", "3"]
    code, printed, err = run(["--data-dir", data, "--base", base_with_rule, "--out", out, *tuned], capsys)
    assert code == 0, err
    assert err == ""  # stderr is for refusals: not the TFLite export's listing of every tensor
    assert "my_lab/eosinophil/cell_0.png: 2 white cells found" in printed  # said for each such file
    assert sorted(p.name for p in out.parent.iterdir()) == ["lab.h5", "lab.json", "lab.tflite", "lab.tflite.json",
                                                            "lab_ood.npz"]
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert "adapted" in metadata["name"]
    adaptation = metadata["adaptation"]
    assert adaptation["base_model"] == "tiny.h5" and adaptation["base_sha256"] == sha256_of(base_with_rule)
    assert adaptation["images_per_class"] == dict.fromkeys(LABELS, 3)
    assert adaptation["figures"]["n"] == 12 and 0.0 <= adaptation["figures"]["accuracy"] <= 1.0
    assert adaptation["method"] and adaptation["created"] == metadata["created"]
    assert "fine-tuned for 3 batches" in adaptation["method"] and adaptation["settings"]["fine_tune_steps"] == 3
    assert "before the fine-tune" in adaptation["figures"]["method"]  # what the leave-one-out figures leave out
    assert metadata["evaluation"] == {}  # the base's test figures do not describe this model
    assert metadata["calibration"]["temperature"] >= 1.0
    assert metadata["abstention"]["min_probability"] == 0.3  # the base's

    classifier = load_classifier(out)
    assert classifier.runtime == "tflite" and classifier.rule.tests_distance
    crops = np.stack([prepare_field(p.read_bytes()).primary_crop for p in sorted(data.glob("*/cell_1.png"))])
    answer = classifier.assess(crops)
    assert answer.probabilities.shape == (4, 4)
    np.testing.assert_allclose(answer.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert not answer.uncertain.any() or set(answer.reasons) <= {"low_confidence", "unlike_training", None}
    # the given images lie within the distance threshold: it is at least their leave-one-out distances
    assert (answer.distances <= metadata["abstention"]["max_distance"] + 1e-3).all()

    code, _, err = run(["--data-dir", data, "--base", base_with_rule, "--out", out, "--force", *tuned], capsys)
    assert code == 0, err  # --force replaces it


def test_a_crash_leaves_nothing_at_out(tmp_path, capsys, base_with_rule, monkeypatch):
    from training import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "write_calibration", broken)
    data = write_lab(tmp_path / "lab", per_class=2)
    out = tmp_path / "out" / "lab.h5"
    with pytest.raises(RuntimeError):
        adapt.main(["--data-dir", str(data), "--base", str(base_with_rule), "--out", str(out),
                    "--fine-tune-steps", "0"])
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unlabelled_images_adapt_the_statistics_alone(tmp_path, capsys, base_with_rule):
    from hematovision.classifier import load_classifier

    folder = tmp_path / "unsorted"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        drawn_field(rng, i % 4).save(folder / f"{i}.png")
    out = tmp_path / "out" / "lab.h5"
    code, _, err = run(["--unlabelled", folder, "--base", base_with_rule, "--out", out], capsys)
    assert code == 0, err
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["adaptation"]["unlabelled_images"] == 4 and metadata["adaptation"]["figures"] is None
    assert "classifier unchanged" in metadata["adaptation"]["method"]
    assert load_classifier(out).predict(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1, 4)
