"""The training command and its library: splits, augmentation, refusals, a real (tiny) end-to-end run, data
parallelism on two logical CPU devices, and train/serve preprocessing identity."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hematovision.classifier import load_classifier
from hematovision.imaging import prepare_field, primary_crop_file
from training import augment, config, splits, train
from training.cropsets import load_crops

DATA = Path(__file__).parent / "data"
SAMPLES = DATA / "samples"
LABELS = config.LABELS


def test_split_by_group_never_puts_a_source_on_both_sides():
    targets = [0] * 30 + [1] * 30
    groups = [f"a{i // 5}" for i in range(30)] + [f"b{i // 3}" for i in range(30)]
    train_idx, val_idx = splits.split_by_group(targets, groups, 0.2, seed=3)
    assert len(train_idx) + len(val_idx) == 60 and len(val_idx) > 0
    assert not {groups[i] for i in train_idx} & {groups[i] for i in val_idx}
    assert {targets[i] for i in val_idx} == {0, 1}  # every class is validated


def test_copies_per_class_take_more_of_each_photo_where_a_class_has_few():
    rows = splits.Rows("kaggle")
    for photo in range(6):  # class 0: 6 photos of 10 copies; class 1: 2 photos of 10 copies
        for copy in range(10):
            rows.add(Path(f"a{photo}_{copy}.jpeg"), 0, f"a{photo}")
    for photo in range(2):
        for copy in range(10):
            rows.add(Path(f"b{photo}_{copy}.jpeg"), 1, f"b{photo}")
    balanced = rows.per_group_by_class(12, seed=0)
    per_group = {g: balanced.groups.count(g) for g in set(balanced.groups)}
    assert per_group == {**{f"a{i}": 2 for i in range(6)}, "b0": 6, "b1": 6}
    assert len(set(balanced.paths)) == len(balanced)  # each file once
    assert rows.per_group(3, seed=0).groups.count("b0") == 3


def write_lisc(root: Path, cells_per_class: int = 5, crops_per_cell: int = 2) -> Path:
    """A LISC-like folder: shifted copies (here: the same sample file) of each cell, listed in groups.csv."""
    folder = root / config.LISC
    rows = []
    for label in [*LABELS, "BASOPHIL"]:
        (folder / label).mkdir(parents=True)
        sample = sorted((SAMPLES / (label if label in LABELS else "NEUTROPHIL")).iterdir())[0]
        for cell in range(cells_per_class):
            for copy in range(crops_per_cell):
                name = f"{label}/{label.lower()}_{cell}_{copy}.jpg"
                shutil.copy(sample, folder / name)
                rows.append({"path": name, "label": label, "cell_id": f"{label.lower()}_{cell}",
                             "source_file": "x.png"})
    with open(folder / config.LISC_GROUPS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "cell_id", "source_file"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_lisc_split_keeps_every_cell_on_one_side_and_basophils_apart(tmp_path):
    root = write_lisc(tmp_path)
    parts = {s: splits.lisc(root, LABELS, s) for s in ("train", "validation", "test")}
    cells = {s: set(rows.groups) for s, rows in parts.items()}
    assert not (cells["train"] & cells["validation"]) and not (cells["train"] & cells["test"])
    assert sum(len(rows) for rows in parts.values()) == 4 * 5 * 2  # every known-type crop, once
    assert -1 not in parts["test"].targets
    with_unknown = splits.lisc(root, LABELS, "test", include_unknown=True)
    assert with_unknown.targets.count(-1) == 2  # one basophil cell (of 5, 20%) with its 2 crops


def test_augment_keeps_shape_and_range_and_follows_its_seed():
    crops = np.stack([primary_crop_file(p) for p in sorted((SAMPLES / "LYMPHOCYTE").iterdir())])
    out = augment.augment(crops, 160, np.random.default_rng(4))
    assert out.shape == (len(crops), 160, 160, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(out, augment.augment(crops, 160, np.random.default_rng(4)))
    assert not np.allclose(out, augment.augment(crops, 160, np.random.default_rng(5)))


def test_restain_moves_each_image_to_colours_drawn_from_the_templates():
    from skimage.color import rgb2lab

    crops = np.stack([primary_crop_file(p) for p in sorted((SAMPLES / "LYMPHOCYTE").iterdir())])
    templates = augment.stain_templates(crops)
    assert templates.shape == (4, 3) and (templates[2] > 0).all()
    batch = augment.augment(crops, 160, np.random.default_rng(4), stain=0, light=0, blur=0)
    other_lab = np.array([[72, 12, -8], [0, 0, 0], [14, 9, 7], [0, 0, 0]], np.float32)  # no spread: one colour
    out = augment.restain(batch.copy(), np.random.default_rng(0), other_lab, share=1.0)
    lab = rgb2lab(out / 255.0)
    np.testing.assert_allclose(lab.mean(axis=(1, 2)), np.tile(other_lab[0], (len(out), 1)), atol=1.5)
    np.testing.assert_allclose(lab.std(axis=(1, 2)), np.tile(other_lab[2], (len(out), 1)), rtol=0.15)
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(augment.restain(batch.copy(), np.random.default_rng(0), other_lab, 0.0), batch)
    # Off by default, and then it draws nothing: the recipe's batches are the ones it always had.
    np.testing.assert_array_equal(augment.augment(crops, 160, np.random.default_rng(4), restained=0.0),
                                  augment.augment(crops, 160, np.random.default_rng(4)))


def test_coarse_goes_as_low_as_it_is_told():
    from PIL import Image

    crop = Image.fromarray(primary_crop_file(sorted((SAMPLES / "NEUTROPHIL").iterdir())[0]))

    def detail(picture):
        return np.abs(np.diff(np.asarray(picture, np.float32).mean(-1), axis=0)).mean()

    mild, strong = (augment.coarse(crop, np.random.default_rng(3), most) for most in (2.0, 6.0))
    assert mild.size == strong.size == crop.size
    assert detail(strong) < detail(mild) < detail(crop)


def write_data_root(root: Path) -> Path:
    """The layout of --data-root with the committed sample cells: Kaggle TRAIN and TEST, and LISC."""
    for split in ("TRAIN", "TEST"):
        for label in LABELS:
            folder = root / config.KAGGLE / "dataset2-master" / "images" / split / label
            folder.mkdir(parents=True)
            for i, sample in enumerate(sorted((SAMPLES / label).iterdir())):
                shutil.copy(sample, folder / f"{split.lower()}_{i}.jpeg")
    return write_lisc(root, cells_per_class=5, crops_per_cell=1)


def run_train(args: list[str]) -> tuple[int, str]:
    process = subprocess.run([sys.executable, "-m", "training.train", *args], capture_output=True, text=True,
                             timeout=600, cwd=config.ROOT)
    return process.returncode, process.stderr


@pytest.mark.parametrize("case", ["no_data_root", "lab_missing", "weights_missing", "out_exists"])
def test_train_refuses_a_users_mistake_with_one_line(tmp_path, case):
    root = write_data_root(tmp_path / "data")
    out = tmp_path / "m.h5"
    args = ["--data-root", str(root), "--out", str(out), "--weights", "none", "--labs", "kaggle,lisc"]
    expected = {"no_data_root": "--data-root not found", "lab_missing": "pbc: expected the folder",
                "weights_missing": "--weights file not found", "out_exists": "exists; pass --force"}[case]
    if case == "no_data_root":
        args[1] = str(tmp_path / "nowhere")
    elif case == "lab_missing":
        args[-1] = "kaggle,pbc"
    elif case == "weights_missing":
        args[5] = str(tmp_path / "nope.h5")
    else:
        out.write_bytes(b"keep me")
    code, stderr = run_train(args)
    assert code == 2
    assert expected in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists() or out.read_bytes() == b"keep me"


@pytest.mark.parametrize("flag,value", [("--restain", "1.5"), ("--grey", "-0.1"), ("--lowres-most", "1")])
def test_train_refuses_an_augmentation_setting_out_of_range(capsys, flag, value):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--data-root", "data", "--out", "m.h5", flag, value])
    assert stopped.value.code == 2 and flag in capsys.readouterr().err


def test_imagenet_weights_offline_name_the_offline_file(monkeypatch, tmp_path):
    import urllib.request

    def no_network(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(splits.DataError, match="--weights PATH.*no_top"):
        train.check_weights("imagenet")


@pytest.mark.slow
def test_one_command_trains_exports_calibrates_and_evaluates(tmp_path):
    root = write_data_root(tmp_path / "data")
    out = tmp_path / "out" / "model.h5"
    code, stderr = run_train(["--data-root", str(root), "--out", str(out), "--weights", "none",
                              "--labs", "kaggle,lisc", "--epochs", "1", "--high-epochs", "1", "--batch-size", "4",
                              "--low-size", "96", "--lisc-repeat", "1", "--workers", "1"])
    assert code == 0, stderr
    for suffix in (".h5", ".json", ".tflite", ".tflite.json"):
        assert out.with_suffix(suffix).is_file()
    assert (out.parent / "model_curves.png").is_file()
    assert not (out.parent / "model.checkpoint").exists()  # a finished run leaves no checkpoint
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["labels"] == LABELS and metadata["image_size"] == [224, 224]
    run = metadata["training"]
    assert run["wall_seconds"] > 0 and run["device"] == "cpu" and run["cpu_count"] >= 1
    assert str(tmp_path) not in json.dumps(metadata)  # no absolute path of this machine
    assert [h["phase"] for h in run["history"]] == ["head", "low", "high"]
    assert set(metadata["evaluation"]) == {"kaggle_test", "lisc_test"}
    assert metadata["evaluation"]["kaggle_test"]["n"] == 12
    assert metadata["calibration"]["model_sha256"] == metadata["abstention"]["model_sha256"]
    # A handful of training cells is too few for the feature density: the distance test is left out, not faked.
    npz = metadata["abstention"]["file"]
    assert (npz is None) == (metadata["abstention"]["max_distance"] is None)
    assert npz is None or (out.parent / npz).is_file()
    # LISC's basophils are never trained on: they teach the "another type of white cell" test, beside the density.
    assert metadata["training"]["data"]["other_types"]["train"]["files"] == 3
    other = metadata["abstention"]["other_types"]
    assert (other is None) == (npz is None) and (other is None or other["types"] == ["BASOPHIL"])
    # The figures are what the served model really answers on the held-out crops.
    classifier = load_classifier(out)
    test = splits.kaggle_folder(root / config.KAGGLE_TEST, LABELS, None)
    crops = load_crops(test, workers=1)
    predicted = classifier.assess(crops.crops).probabilities.argmax(1)
    correct = int((predicted == crops.targets).sum())  # a file without a found cell counts as wrong
    assert metadata["evaluation"]["kaggle_test"]["accuracy"] == pytest.approx(correct / len(test))


@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    root = write_data_root(tmp_path / "data")
    out = tmp_path / "out" / "model.h5"
    args = ["--data-root", str(root), "--out", str(out), "--weights", "none", "--labs", "kaggle,lisc",
            "--epochs", "2", "--high-epochs", "1", "--batch-size", "4", "--low-size", "64", "--lisc-repeat", "1",
            "--average", "3", "--workers", "1"]
    finish_epoch = train.EpochEnd.__call__

    def ctrl_c_after_the_first_low_epoch(self, phase, epoch, logs):
        finish_epoch(self, phase, epoch, logs)
        if (phase, epoch) == ("low", 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(train.EpochEnd, "__call__", ctrl_c_after_the_first_low_epoch)
    assert train.main(args) == 130
    assert "--resume" in capsys.readouterr().err
    checkpoint = out.with_name("model.checkpoint")
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["done"] == ["head:1", "low:1"] and not out.exists()  # nothing half-written at --out
    saved = (checkpoint / "last.weights.h5").read_bytes()

    monkeypatch.setattr(train.EpochEnd, "__call__", finish_epoch)
    assert train.main([*args[:-2], "--epochs", "3"] + args[-2:] + ["--resume"]) == 2  # other settings: refused
    assert (checkpoint / "last.weights.h5").read_bytes() == saved
    assert train.main(args + ["--resume"]) == 0
    run = json.loads(out.with_suffix(".json").read_text())["training"]
    # The run went on from the second low epoch: nothing done twice, nothing skipped.
    assert [(h["phase"], h["epoch"]) for h in run["history"]] == [("head", 1), ("low", 1), ("low", 2), ("high", 1)]
    assert run["average"]["epochs"] == ["low_1", "low_2", "high_1"]  # the epoch before Ctrl-C still counts
    assert not checkpoint.exists()


def test_the_mean_of_the_last_epochs_weights_is_kept_only_when_it_validates_as_well(tmp_path):
    from types import SimpleNamespace

    from hematovision.network import build_model

    model = build_model(len(LABELS), weights=None, image_size=(32, 32))
    rng = np.random.default_rng(0)
    start = model.get_weights()
    snapshots = {}
    for name in ("low_1", "low_2", "high_1"):
        snapshots[name] = [w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in start]
        model.set_weights(snapshots[name])
        model.save_weights(tmp_path / f"{name}.weights.h5")
    history = [{"phase": "head", "epoch": 1}, {"phase": "low", "epoch": 1}, {"phase": "low", "epoch": 2},
               {"phase": "high", "epoch": 1}]
    val = {"kaggle": SimpleNamespace(crops=rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
                                     targets=np.arange(8) % len(LABELS))}
    progress = train.Progress(0.0)

    model.set_weights(snapshots["low_1"])  # the best single epoch
    state = {"history": history, "best_val_mean": -1.0, "best": {"phase": "low", "epoch": 1}}
    train.average_last_epochs(model, 2, tmp_path, val, state, progress)
    assert state["average"]["epochs"] == ["low_2", "high_1"] and state["average"]["kept"]
    assert state["best"] == {"phase": "average", "epoch": ["low_2", "high_1"]}
    for got, a, b in zip(model.get_weights(), snapshots["low_2"], snapshots["high_1"], strict=True):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-7)

    model.set_weights(snapshots["low_1"])
    state = {"history": history, "best_val_mean": 1.5, "best": {"phase": "low", "epoch": 1}}  # cannot be matched
    train.average_last_epochs(model, 3, tmp_path, val, state, progress)
    assert not state["average"]["kept"] and state["best"] == {"phase": "low", "epoch": 1}
    for got, best in zip(model.get_weights(), snapshots["low_1"], strict=True):
        np.testing.assert_array_equal(got, best)


def test_training_batches_do_not_depend_on_the_number_of_loader_threads():
    """--loader-workers only changes how fast batches are made: fitting on them gives the same weights."""
    import keras

    rng = np.random.default_rng(0)
    x = {"kaggle": rng.integers(0, 256, (24, 48, 48, 3), dtype=np.uint8)}
    y = {"kaggle": np.arange(24) % len(LABELS)}
    weights = []
    for workers in (1, 3):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                                  keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(len(LABELS), activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
        start = model.get_weights()[-1].copy()
        model.fit(train.batches(x, y, {}, 32, 4, 7, 0, workers=workers), epochs=2, verbose=0)
        weights.append(model.get_weights())
        assert not np.array_equal(weights[-1][-1], start)  # it did train
    for one, several in zip(*weights, strict=True):
        np.testing.assert_array_equal(one, several)


@pytest.mark.slow
def test_data_parallel_training_runs_on_two_logical_cpu_devices():
    script = """
import numpy as np, keras
from training.train import distribution_scope
from hematovision.network import build_model
with distribution_scope(2) as scope:
    import tensorflow as tf
    strategy = tf.distribute.get_strategy()
    model = build_model(4, weights=None, image_size=(32, 32))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
history = model.fit(x, np.arange(16) % 4, batch_size=8, epochs=1, verbose=0)
print(strategy.num_replicas_in_sync, len(history.history["loss"]))
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             cwd=config.ROOT)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.split()[-2:] == ["2", "1"]


def test_training_and_serving_see_identical_arrays(app, client):
    """The crop training takes from a file is the crop the app feeds the model for that upload."""
    path = DATA / "fields" / sorted(p.name for p in (DATA / "fields").glob("*.jpg"))[0]
    classifier = app.extensions["hematovision"]
    seen = []
    real_run = classifier.run

    def spy(batch, *args, **kwargs):  # records the served input, then runs the real model
        seen.append(np.array(batch, copy=True))
        return real_run(batch, *args, **kwargs)

    classifier.run = spy
    try:
        response = client.post("/api/predict", data={"file": (path.open("rb"), path.name)},
                               content_type="multipart/form-data")
    finally:
        classifier.run = real_run
    assert response.status_code == 200
    training_crop = primary_crop_file(path)
    field = prepare_field(path.read_bytes())
    assert training_crop is not None and training_crop.dtype == np.uint8 and training_crop.shape == (224, 224, 3)
    served = np.concatenate([np.asarray(b).reshape(-1, 224, 224, 3) for b in seen])
    assert any(np.array_equal(crop, training_crop) for crop in served)
    np.testing.assert_array_equal(field.primary_crop, training_crop)
