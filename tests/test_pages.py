"""The model card, its figures, the navigation, and the sample images (tiny real model, no mocks)."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
from PIL import Image

from app import create_app
from hematovision.pages import SAMPLES, SAMPLES_DIR, describe_figure, describe_model, list_model_figures, set_name
from tests.test_app import assert_no_inline_code

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def page_text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


@pytest.fixture
def carded_model(tiny_model_path, tmp_path):
    """The tiny model with a full metadata file and two figures next to it, as training/ writes them."""
    model = tmp_path / "card_model.h5"
    shutil.copy(tiny_model_path, model)
    meta = json.loads(tiny_model_path.with_suffix(".json").read_text())
    meta.update(
        name="Card test model",
        created="2026-01-02T03:04:05+00:00",
        architecture="A tiny convolution",
        training={"images": 100, "train_images": 85, "validation_images": 15, "class_counts": {"EOSINOPHIL": 25}},
        validation={"accuracy": 0.75, "n": 15},
        evaluation={
            "kaggle_test": {
                "n": 40,
                "accuracy": 0.875,
                "accuracy_ci95": [0.74, 0.95],
                "macro_f1": 0.87,
                "per_class": {"EOSINOPHIL": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 10}},
            }
        },
    )
    model.with_suffix(".json").write_text(json.dumps(meta))
    for name in ("card_model_curves.png", "confusion_kaggle_test.png"):
        Image.new("RGB", (40, 30), "white").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a figure")
    return model


def test_model_card_shows_metadata_figures_and_limitations(carded_model):
    client = create_app({"TESTING": True, "MODEL_PATH": str(carded_model)}).test_client()
    response = client.get("/model")
    assert response.status_code == 200
    text = page_text(response)
    for expected in ("Card test model", "A tiny convolution", "75.0%", "87.5%", "74–95%", "Limitations",
                     "2 January 2026", "Kaggle TEST"):
        assert expected in text
    assert "Confusion matrix, Kaggle TEST" in text and "2026-01-02T" not in text
    srcs = re.findall(r'<img src="(/model/files/[^"]+)"', text)
    assert srcs == ["/model/files/card_model_curves.png", "/model/files/confusion_kaggle_test.png"]
    for src in srcs:
        with client.get(src) as figure:  # a file response: close it
            assert figure.status_code == 200 and figure.mimetype == "image/png"


@pytest.mark.parametrize("name", ["notes.txt", "card_model.h5", "card_model.json", "..%2Fetc%2Fpasswd", "nope.png"])
def test_only_the_figures_next_to_the_model_are_served(carded_model, name):
    client = create_app({"TESTING": True, "MODEL_PATH": str(carded_model)}).test_client()
    assert client.get(f"/model/files/{name}").status_code == 404


def test_model_card_copes_with_minimal_metadata(client):
    text = page_text(client.get("/model"))
    assert "No held-out test figures" in text and "Limitations" in text


def test_header_links_to_the_model_card(client):
    nav = re.search(r'<nav class="site-nav"[^>]*>(.*?)</nav>', client.get("/").get_data(as_text=True), re.S)
    assert nav and 'href="/model"' in nav.group(1)


def test_home_page_offers_one_sample_per_class(client):
    text = page_text(client.get("/"))
    assert re.findall(r'name="name" value="(\w+)"', text) == list(SAMPLES)
    assert 'action="/predict/sample"' in text
    first_form = re.search(r"<form[^>]*>", text).group(0)
    assert 'action="/predict"' in first_form  # the upload form stays first
    for filename in SAMPLES.values():
        assert (SAMPLES_DIR / filename).is_file()
        with client.get(f"/static/samples/{filename}") as image:
            assert image.status_code == 200


@pytest.mark.parametrize("name", list(SAMPLES))
def test_a_sample_is_classified_without_an_upload(client, name):
    response = client.post("/predict/sample", data={"name": name})
    assert response.status_code == 200
    text = page_text(response)
    assert re.search(r"Predicted Class: [A-Z]+", text)
    assert f"Sample: {SAMPLES[name]}" in text


@pytest.mark.parametrize("name", ["", "../app.py", "basophil", "eosinophil.jpeg"])
def test_an_unknown_sample_is_refused(client, name):
    response = client.post("/predict/sample", data={"name": name})
    assert response.status_code == 400
    assert "Unknown sample" in page_text(response)


def test_new_pages_have_no_inline_styles_scripts_or_external_resources(carded_model, make_image):
    import io

    from werkzeug.datastructures import FileStorage, MultiDict
    from werkzeug.test import stream_encode_multipart

    client = create_app({"TESTING": True, "MODEL_PATH": str(carded_model)}).test_client()
    fields = MultiDict([("file", FileStorage(io.BytesIO(make_image()), n)) for n in ("a.png", "b.png")])
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    pages = [
        client.get("/model"),
        client.post("/predict", data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}"),
        client.post("/predict/sample", data={"name": "eosinophil"}),
    ]
    for response in pages:
        assert response.status_code == 200
        assert_no_inline_code(response.get_data(as_text=True))


# --- the model card of a model trained on three labs, as training/train.py describes it ---------------------


def evaluation_figures(n: int, accuracy: float, answered: float, **extra) -> dict:
    """One test set's figures, with the keys training/pipeline.py's assess_crops writes."""
    per_class = {label: {"precision": accuracy, "recall": accuracy - 0.01 * i, "f1": accuracy, "support": n // 4}
                 for i, label in enumerate(LABELS)}
    return {"n": n, "accuracy": accuracy, "accuracy_ci95": [accuracy - 0.02, accuracy + 0.01], "macro_f1": accuracy,
            "per_class": per_class, "labels": LABELS, "confusion_matrix": [[0] * 4] * 4, "ece": 0.02,
            "abstention_rate": 1 - answered, "abstained": round(n * (1 - answered)), "answered": round(n * answered),
            "accuracy_answered": min(1.0, accuracy + 0.02), "no_white_cell_found": 3, **extra}


def realistic_metadata() -> dict:
    """Metadata with the keys of training/train.py's describe() and run() (three labs, LISC's basophils)."""
    history = [{"phase": phase, "epoch": epoch, "loss": 1.0 / (i + 1), "accuracy": 0.5 + 0.05 * i,
                "val_accuracy": {"kaggle": 0.6 + 0.03 * i, "pbc": 0.8 + 0.02 * i, "lisc": 0.75 + 0.02 * i},
                "val_mean": 0.72 + 0.02 * i, "seconds": 120.5}
               for i, (phase, epoch) in enumerate([("head", 1), ("low", 1), ("low", 2), ("high", 1)])]
    counts = {"files": 100, "cells_found": 98}
    return {
        "name": "HematoVision MobileNetV2 white-cell classifier",
        "labels": LABELS,
        "image_size": [224, 224],
        "input": "RGB, 224x224, pixel values 0-255 (uint8 range); scaling to [-1, 1] is inside the model",
        "preprocessing": "hematovision.imaging.prepare_field: decode, EXIF orientation, RGB, find each white cell",
        "architecture": "MobileNetV2 alpha 1.0 (ImageNet-initialised) + global average pooling + dropout + dense",
        "created": "2026-11-30T12:01:02+00:00",
        "training": {
            "command": "python training/train.py --data-root ../shared/data --weights w.h5 --out model/m.h5",
            "labs": ["kaggle", "pbc", "lisc"],
            "held_out_lab": None,
            "data": {split: {lab: counts for lab in ("kaggle", "pbc", "lisc")}
                     for split in ("train", "validation", "test")},
            "splits": "Kaggle TRAIN: validation = whole source photos; PBC: training/splits/pbc_split.csv",
            "chosen_on": "the epoch with the best mean validation accuracy over the training labs",
            "base_weights": "mobilenet_v2_1.0_224_no_top.h5",
            "settings": {"weights": "../shared/weights/w.h5", "labs": ["kaggle", "pbc", "lisc"], "hold_out": None,
                         "seed": 1337, "lr": 0.0005, "epochs": 8, "fine_tune_from": "", "limit": 0},
            "history": history,
            "best_epoch": {"phase": "low", "epoch": 2},
            "device": "cpu",
            "cpu_count": 2,
            "wall_seconds": 2530.4,
        },
        "versions": {"python": "3.12.3", "keras": "3.15.1"},
        "validation": {"mean_accuracy": 0.93, "by_lab": {"kaggle": 0.87, "pbc": 0.97, "lisc": 0.95}},
        "evaluation": {
            "kaggle_test": evaluation_figures(2487, 0.912, 0.969, per_source_summary={"n_sources": 71}),
            "pbc_test": evaluation_figures(720, 0.972, 0.992),
            "lisc_test": evaluation_figures(103, 0.951, 0.96,
                                            unknown_type={"n": 11, "flagged": 7, "flag_rate": 7 / 11}),
        },
    }


LEAVE_ONE_LAB_OUT = {
    "held_out": {lab: {"trained_on": [other for other in ("kaggle", "pbc", "lisc") if other != lab], "n": 100,
                       "accuracy": accuracy, "accuracy_ci95": [accuracy - 0.05, accuracy + 0.05], "answered": 0.7,
                       "accuracy_answered": accuracy + 0.1, "no_white_cell_found": 0, "wall_seconds": 900}
                 for lab, accuracy in (("kaggle", 0.512), ("pbc", 0.703), ("lisc", 0.786))},
    "shipped": {"kaggle": {"n": 2487, "accuracy": 0.912, "answered": 0.969, "accuracy_answered": 0.93}},
}


def write_model(tiny_model_path, folder, metadata: dict, lolo: dict | None = None):
    """The tiny model under `folder` with this metadata, its curves and confusion matrices as train.py names them,
    and the leave-one-lab-out table beside it when given."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "blood_cell_model.h5"
    shutil.copy(tiny_model_path, model)
    model.with_suffix(".json").write_text(json.dumps(metadata), encoding="utf-8")
    Image.new("RGB", (1100, 400), "white").save(folder / "blood_cell_model_curves.png")
    for name in metadata.get("evaluation") or {}:
        Image.new("RGB", (500, 450), "white").save(folder / f"blood_cell_model_confusion_{name}.png")
    Image.new("RGB", (500, 450), "white").save(folder / "confusion_kaggle_test.png")  # an older model's figure
    if lolo is not None:
        (folder / "leave_one_lab_out.json").write_text(json.dumps(lolo), encoding="utf-8")
    return model


@pytest.fixture
def realistic_model(tiny_model_path, tmp_path):
    return write_model(tiny_model_path, tmp_path / "realistic", realistic_metadata(), LEAVE_ONE_LAB_OUT)


def test_model_card_reads_like_a_model_card(realistic_model):
    client = create_app({"TESTING": True, "MODEL_PATH": str(realistic_model)}).test_client()
    raw = client.get("/model").get_data(as_text=True)
    text = " ".join(html.unescape(raw).split())
    # What it is for, then limitations and figures, then the charts, then details folded.
    order = ["finds each white blood cell"] + [f"{heading}</h2>" for heading in (
        "Limitations", "How well it does", "A lab it has never seen", "What the words mean", "Charts", "Details")]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order)
    assert "30 November 2026" in text and "2026-11-30" not in text  # a date as people write it
    assert "42 minutes on a CPU (2 cores)" in text
    for name in ("Kaggle TEST", "PBC test", "LISC test"):
        assert f'<th scope="row">{name}' in text
    assert "91.2%" in text and "96.9%" in text and "93.2%" in text  # right, answered, right when answered
    assert ('LISC test also holds 11 basophils, a type the model does not know: 7 were answered "uncertain" and 4'
            in text)
    assert 'of 11 basophils in the LISC test, 7 were answered "uncertain"' in text  # and the limitations say so
    assert '<th scope="row">Kaggle</th> <td class="num"><strong>51.2%</strong>' in text  # leave-one-lab-out
    # Settings, command, history and versions are folded, and no raw settings string is shown.
    details = text[text.index('<h2 id="details-heading">'):]
    for summary in ("Settings", "Command", "Training history, epoch by epoch", "Software versions"):
        assert f"<summary>{summary}</summary>" in details
    assert "fine_tune_from=" not in text and "{'" not in text and "weights" not in details.split("Settings")[1][:400]
    assert "<dt>fine tune from</dt><dd>none</dd>" in details and "<dt>labs</dt><dd>Kaggle, PBC, LISC</dd>" in details
    assert "over the training labs: low phase, epoch 2 (of 4)." in text
    assert "low 2 (kept)" in details
    # The charts: curves first, then each test set's confusion matrix in the metadata's order; not the older figure.
    srcs = re.findall(r'<img src="/model/files/([^"]+)"', raw)
    assert srcs == ["blood_cell_model_curves.png", "blood_cell_model_confusion_kaggle_test.png",
                    "blood_cell_model_confusion_pbc_test.png", "blood_cell_model_confusion_lisc_test.png"]
    assert "Confusion matrix, PBC test" in text
    assert client.get("/model/files/confusion_kaggle_test.png").status_code == 404  # not this model's


def test_model_card_names_averaged_weights_in_words(tiny_model_path, tmp_path):
    metadata = realistic_metadata()
    metadata["training"]["best_epoch"] = {"phase": "average", "epoch": ["low_2", "high_1"]}
    model = write_model(tiny_model_path, tmp_path / "averaged", metadata)
    client = create_app({"TESTING": True, "MODEL_PATH": str(model)}).test_client()
    text = " ".join(html.unescape(client.get("/model").get_data(as_text=True)).split())
    assert ": the mean of the weights of low 2 and high 1 (of 4)." in text and "['" not in text


def test_a_held_out_lab_and_a_missing_table_are_said_plainly(tiny_model_path, tmp_path):
    metadata = realistic_metadata()
    metadata["training"] |= {"labs": ["kaggle", "pbc"], "held_out_lab": "lisc", "device": "NVIDIA H200"}
    metadata["evaluation"]["lisc_test_held_out_lab"] = metadata["evaluation"].pop("lisc_test")
    model = write_model(tiny_model_path, tmp_path / "held_out", metadata)
    text = " ".join(page_text(create_app({"TESTING": True, "MODEL_PATH": str(model)}).test_client().get("/model"))
                    .split())
    assert "LISC test (a lab it never saw)" in text and "Kaggle, PBC images (LISC held out)" in text
    assert "on NVIDIA H200" in text and "A lab it has never seen" not in text


def test_an_adapted_model_says_so_first(tiny_model_path, tmp_path):
    base = realistic_metadata()
    metadata = {key: value for key, value in base.items() if key not in ("evaluation", "validation")}
    metadata["name"] = base["name"] + ", adapted to the lab of 'mylab' (40 labelled images)"
    metadata["evaluation"] = {}
    metadata["adaptation"] = {
        "base_model": "blood_cell_model.h5", "base_name": base["name"], "created": "2026-12-01T09:00:00+00:00",
        "data": "mylab", "images_per_class": {label: 10 for label in LABELS}, "unlabelled_images": 0,
        "method": "batch-norm statistics of the lab; final dense layer refitted", "command": "python training/adapt.py",
        "figures": {"n": 40, "accuracy": 0.9, "accuracy_ci95": [0.77, 0.96]}, "seconds": 95.2,
        "base_evaluation": base["evaluation"], "settings": {"fine_tune_steps": 80},
    }
    model = write_model(tiny_model_path, tmp_path / "adapted", metadata)
    text = " ".join(page_text(create_app({"TESTING": True, "MODEL_PATH": str(model)}).test_client().get("/model"))
                    .split())
    headline = f"Adapted from {base['name']} on 10 images per class"
    assert headline in text and text.index(headline) < text.index("Limitations")
    assert "1 December 2026" in text and "90.0%" in text and "77.0%–96.0%" in text
    assert "each left out in turn (before the last step, a short training on all of them):" in text
    assert "The figures below are the base model's" in text and "91.2%" in text  # the base's, said to be


@pytest.mark.parametrize("broken", [
    {"training": "not a dict"}, {"evaluation": {"kaggle_test": {"accuracy": "high"}}}, {"created": "yesterday"},
    {"training": {"history": [None, {"phase": "head"}], "settings": None, "data": {"train": []}}},
    {"adaptation": {"images_per_class": None, "figures": [], "settings": [1]}},
    {"validation": {"by_lab": {"kaggle": None}}},
])
def test_model_card_never_fails_on_odd_metadata(tiny_model_path, tmp_path, broken):
    model = write_model(tiny_model_path, tmp_path / "odd", realistic_metadata() | broken, {"held_out": []})
    assert create_app({"TESTING": True, "MODEL_PATH": str(model)}).test_client().get("/model").status_code == 200


def test_set_names_and_figure_captions_as_a_lab_says_them():
    assert [set_name(key) for key in ("kaggle_test", "pbc_test", "lisc_test", "kaggle_test_simple",
                                      "lisc_test_held_out_lab")] == [
        "Kaggle TEST", "PBC test", "LISC test", "Kaggle TEST_SIMPLE", "LISC test (a lab it never saw)"]
    assert describe_figure("blood_cell_model_confusion_pbc_test.png").startswith("Confusion matrix, PBC test")
    assert describe_figure("confusion_kaggle_test.png").startswith("Confusion matrix, Kaggle TEST")
    assert describe_figure("m_curves.png").startswith("Training")
    assert describe_model({}, LABELS)["sets"] == [] and list_model_figures(SAMPLES_DIR / "none.h5") == []
