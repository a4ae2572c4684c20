"""The model card, its figures, the navigation, and the sample images (tiny real model, no mocks)."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
from PIL import Image

from app import create_app
from hematovision.pages import SAMPLES, SAMPLES_DIR


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
    for expected in ("Card test model", "A tiny convolution", "75.0%", "87.5%", "74.0–95.0%", "0.870", "Limitations"):
        assert expected in text
    assert "Confusion matrix on kaggle test" in text
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
        text = response.get_data(as_text=True)
        assert response.status_code == 200
        assert "<script" not in text and " style=" not in text and "<style" not in text
        assert not re.search(r'(src|href)="(https?:)?//', text)
