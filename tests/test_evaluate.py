"""evaluate.py with the tiny real model on a folder of committed sample cells: the figures are what the served
classifier answers, unknown types are counted apart, and the JSON, plot and metadata are written."""

import json
import shutil
from pathlib import Path

import numpy as np

from hematovision.classifier import load_classifier
from training import evaluate, metrics, splits
from training.cropsets import load_crops

SAMPLES = Path(__file__).parent / "data" / "samples"


def test_wilson_interval_brackets_the_rate():
    low, high = metrics.wilson_interval(90, 100)
    assert 0.82 < low < 0.9 < high < 0.95
    assert metrics.wilson_interval(10, 10)[1] == 1.0


def test_evaluate_reports_honest_figures_on_a_folder(tiny_model_path, tmp_path):
    model = tmp_path / "m.h5"
    shutil.copy(tiny_model_path, model)
    shutil.copy(tiny_model_path.with_suffix(".json"), model.with_suffix(".json"))
    data = tmp_path / "data"
    for folder in SAMPLES.iterdir():
        if folder.is_dir():
            shutil.copytree(folder, data / folder.name.lower())  # lower case: matching ignores case
    shutil.copytree(SAMPLES / "NEUTROPHIL", data / "basophil")
    out_json, out_png = tmp_path / "r.json", tmp_path / "cm.png"
    code = evaluate.main(["--model", str(model), "--data-dir", str(data), "--json", str(out_json),
                          "--plot", str(out_png), "--update-metadata", "tiny"])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert result["n"] == 12 and result["unknown_type"]["n"] == 3
    classifier = load_classifier(model)
    crops = load_crops(splits.folder_rows(data, classifier.labels))
    predicted = classifier.assess(crops.crops).probabilities.argmax(axis=1)
    assert result["accuracy"] == np.sum(predicted == crops.targets) / 12
    assert out_png.stat().st_size > 1000
    assert json.loads(model.with_suffix(".json").read_text())["evaluation"]["tiny"]["n"] == 12


def test_evaluate_refuses_a_missing_folder_with_one_line(tiny_model_path, tmp_path, capsys):
    assert evaluate.main(["--model", str(tiny_model_path), "--data-dir", str(tmp_path / "nope")]) == 2
    assert "data folder not found" in capsys.readouterr().err
