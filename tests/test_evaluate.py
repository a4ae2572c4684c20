"""evaluate.py on a tiny folder with the tiny real model: figures, skipped classes, JSON, plot, metadata."""

import json
import shutil

import numpy as np

from hematovision.classifier import load_classifier
from hematovision.datasets import list_images, load_arrays
from tests.test_training import write_class_folders
from training import evaluate


def test_wilson_interval_brackets_the_rate():
    low, high = evaluate.wilson_interval(90, 100)
    assert 0.82 < low < 0.9 < high < 0.95
    assert evaluate.wilson_interval(10, 10)[1] == 1.0


def test_evaluate_reports_honest_figures_on_a_tiny_folder(tiny_model_path, tmp_path):
    model = tmp_path / "m.h5"
    shutil.copy(tiny_model_path, model)
    shutil.copy(tiny_model_path.with_suffix(".json"), model.with_suffix(".json"))
    data = write_class_folders(tmp_path / "data", per_class=3, extra_class="BASOPHIL")
    out_json, out_png = tmp_path / "r.json", tmp_path / "cm.png"
    result = evaluate.main(["--data-dir", str(data), "--model", str(model), "--json", str(out_json),
                            "--plot", str(out_png), "--update-metadata", "tiny"])

    assert {"n", "accuracy", "macro_f1", "per_class", "confusion_matrix", "labels"} <= set(result)
    assert result["n"] == 12
    assert result["skipped_folders"] == {"basophil": 3}
    assert np.asarray(result["confusion_matrix"]).sum() == 12
    # The reported accuracy is what the model really does on these files.
    classifier = load_classifier(model)
    image_set = list_images(data, classifier.labels)
    predicted = classifier.predict(load_arrays(image_set.paths)).argmax(axis=1)
    assert result["accuracy"] == np.mean(predicted == np.asarray(image_set.targets))
    assert json.loads(out_json.read_text())["n"] == 12
    assert out_png.stat().st_size > 1000
    assert json.loads(model.with_suffix(".json").read_text())["evaluation"]["tiny"]["n"] == 12


def test_evaluate_split_csv_sources_calibration_and_abstention(tiny_model_path, tmp_path):
    """--split-csv/--split pick the rows; --sources gives figures per source photo; ECE and the abstention
    figures are reported (the tiny model has no fitted rule: its plain 0.6 threshold is the one applied)."""
    import csv

    model = tmp_path / "m.h5"
    shutil.copy(tiny_model_path, model)
    shutil.copy(tiny_model_path.with_suffix(".json"), model.with_suffix(".json"))
    data = write_class_folders(tmp_path / "data", per_class=4)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpeg"))
    split_csv, sources_csv = tmp_path / "split.csv", tmp_path / "sources.csv"
    with open(split_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for i, path in enumerate(files):
            writer.writerow([path, path.split("/")[0].upper(), "test" if i % 2 else "train"])
    with open(sources_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source_id"])
        for i, path in enumerate(files):
            writer.writerow([path, f"{path.split('/')[0]}-{i // 4}"])  # one source photo per class here
    result = evaluate.main(["--data-dir", str(data), "--model", str(model), "--split-csv", str(split_csv),
                            "--split", "test", "--sources", str(sources_csv)])
    assert result["n"] == 8 and result["split"] == "test"
    classifier = load_classifier(model)
    paths = [data / path for i, path in enumerate(files) if i % 2]
    probs = classifier.predict(load_arrays(paths))
    targets = np.repeat(np.arange(4), 2)
    assert result["ece"] == evaluate_ece(probs, targets)
    uncertain = probs.max(axis=1) < 0.6
    assert result["abstained"] == int(uncertain.sum())
    assert result["answered"] + result["abstained"] == 8
    assert np.asarray(result["confusion_matrix_with_uncertain"])[:, -1].sum() == result["abstained"]
    assert result["per_source"]["n_sources"] == 4
    assert sum(s["n"] for s in result["per_source"]["sources"].values()) == 8


def evaluate_ece(probs, targets):
    from hematovision.abstention import expected_calibration_error

    return expected_calibration_error(probs, targets)
