"""Training pipeline: the grouped split, a real (tiny) training run, and train/serve preprocessing identity."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from hematovision.classifier import load_classifier
from hematovision.datasets import list_images, load_arrays
from hematovision.imaging import prepare_bytes
from training import split_pbc, train

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def write_class_folders(root, per_class=4, size=(80, 60), extra_class=None):
    """Small real JPEGs, one colour family per class, so a model has something to learn."""
    rng = np.random.default_rng(0)
    folders = LABELS + ([extra_class] if extra_class else [])
    for k, label in enumerate(folders):
        (root / label.lower()).mkdir(parents=True)  # lower case on purpose: matching is case-insensitive
        for i in range(per_class):
            base = np.array([40 + 50 * k, 200 - 40 * k, 120], np.float64)
            pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label.lower() / f"img_{i}.jpeg", quality=90)
    return root


def test_split_by_group_never_puts_a_source_on_both_sides():
    targets = [0] * 30 + [1] * 30
    groups = [f"a{i // 5}" for i in range(30)] + [f"b{i // 3}" for i in range(30)]
    train_idx, val_idx = train.split_by_group(targets, groups, 0.2, seed=3)
    assert len(train_idx) + len(val_idx) == 60 and len(val_idx) > 0
    assert not {groups[i] for i in train_idx} & {groups[i] for i in val_idx}
    assert {targets[i] for i in val_idx} == {0, 1}  # every class is validated


def test_read_sources_uses_the_csv_and_flags_unknown_files(tmp_path, capsys):
    csv_path = tmp_path / "sources.csv"
    csv_path.write_text("path,label,source_id\nEOSINOPHIL/a.jpeg,EOSINOPHIL,7\nEOSINOPHIL/b.jpeg,EOSINOPHIL,7\n")
    groups = train.read_sources(csv_path, ["EOSINOPHIL/a.jpeg", "EOSINOPHIL/b.jpeg", "EOSINOPHIL/c.jpeg"])
    assert groups[0] == groups[1] == "src7"
    assert groups[2] == "file:EOSINOPHIL/c.jpeg"
    assert "1 of 3 images have no known source photo" in capsys.readouterr().out


@pytest.mark.slow
def test_training_smoke_run_writes_a_loadable_model_with_metadata(tmp_path):
    data = write_class_folders(tmp_path / "data", per_class=4)
    pbc = write_class_folders(tmp_path / "pbc", per_class=3, size=(72, 72))
    split_pbc.main(["--data-dir", str(pbc), "--out", str(tmp_path / "pbc_split.csv")])  # 2 train, 1 val per class
    out = tmp_path / "out" / "model.h5"
    metadata = train.main(["--data-dir", str(data), "--out", str(out), "--weights", "none", "--head-epochs", "1",
                           "--epochs", "1", "--batch-size", "8", "--sources", str(tmp_path / "none.csv"),
                           "--pbc-dir", str(pbc), "--pbc-split", str(tmp_path / "pbc_split.csv"),
                           "--loop", "fit"])
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert (tmp_path / "out" / "model_curves.png").stat().st_size > 1000
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["labels"] == LABELS == metadata["labels"]
    assert on_disk["image_size"] == [224, 224]
    assert on_disk["training"]["epochs_run"] == {"head": 1, "fine_tune": 1, "best_epoch": 2,
                                                 "stopped_by_time_budget": False}
    assert {"keras", "numpy", "backend"} <= set(on_disk["versions"])
    assert on_disk["training"]["train_images"] + on_disk["training"]["validation_images"] == 16 + 12
    assert on_disk["training"]["pbc"]["train"] == 8 and on_disk["training"]["pbc"]["validation"] == 4
    assert set(on_disk["validation"]["by_domain"]) == {"kaggle", "pbc"}
    assert len(on_disk["training"]["history"]["val_accuracy_pbc"]) == 2  # one per epoch, both phases

    classifier = load_classifier(out)
    probs = classifier.predict(load_arrays(list_images(data).paths[:3]))
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_training_and_serving_see_identical_arrays(app, client, tmp_path):
    """The array the app feeds the model for an upload equals the array training loads for that file."""
    rng = np.random.default_rng(1)
    path = tmp_path / "cell.jpeg"
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(path, quality=85)
    classifier = app.extensions["hematovision"]
    seen = []
    real_run = classifier.run  # the model call behind predict() and assess()

    def spy(batch):  # records the served input, then runs the real model
        seen.append(np.array(batch, copy=True))
        return real_run(batch)

    classifier.run = spy
    try:
        response = client.post("/predict", data={"file": (io.BytesIO(path.read_bytes()), "cell.jpeg")},
                               content_type="multipart/form-data")
    finally:
        classifier.run = real_run
    assert response.status_code == 200
    training_array = load_arrays([path])[0]
    assert len(seen) == 1
    np.testing.assert_array_equal(np.asarray(seen[0]).reshape(training_array.shape), training_array)
    np.testing.assert_array_equal(prepare_bytes(path.read_bytes()), training_array)
    assert training_array.dtype == np.uint8 and training_array.shape == (224, 224, 3)


def test_continuing_keeps_the_starting_weights_only_when_no_epoch_beat_them(tiny_model_path):
    import keras

    model = keras.models.load_model(tiny_model_path, compile=False)
    start = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1.0 for w in start])
    assert not train.keep_start_if_not_beaten(model, tiny_model_path, start_loss=1.0, best_loss=0.5)
    np.testing.assert_array_equal(model.get_weights()[0], start[0] + 1.0)  # an epoch was better: kept
    assert not train.keep_start_if_not_beaten(model, tiny_model_path, start_loss=None, best_loss=9.0)
    assert train.keep_start_if_not_beaten(model, tiny_model_path, start_loss=1.0, best_loss=1.0)
    for got, want in zip(model.get_weights(), start, strict=True):
        np.testing.assert_array_equal(got, want)
