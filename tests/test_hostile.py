"""Hostile uploads (tests/data/hostile, see its make_corpus.py and manifest.json) posted to /predict: each gets
the right status and message, nothing internal leaks into the page, and the app keeps serving."""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from app import create_app

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "data" / "hostile"
FIELDS = Path(__file__).resolve().parent / "data" / "fields"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
LEAKS = ("Traceback", 'File "', "site-packages", str(ROOT), "/tmp/", "Errno", "PIL.", "werkzeug")
MIB = 1024 * 1024


def case_id(case: dict) -> str:
    name = case["file"] or "no-file-part"
    if case["upload_name"] not in (None, case["file"]):
        name += " as " + ascii(case["upload_name"])[1:41]
    if case["field"] != "file":
        name += f" in field {case['field']}"
    return name


def post(client, files: list[tuple[str, str, bytes]], fields: dict | None = None):
    """multipart/form-data with these (field, filename, bytes) parts; with none, a form with one plain field.
    Encoded in memory: the test client would spool a big body to a temporary file and leave it open on a 413."""
    data = MultiDict(fields or ({} if files else {"note": "hostile"}))
    for field, filename, content in files:
        data.add(field, FileStorage(io.BytesIO(content), filename, content_type="application/octet-stream"))
    body, _length, boundary = stream_encode_multipart(data, use_tempfile=False)
    return client.post("/predict", data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


def assert_clean(response) -> str:
    body = response.get_data(as_text=True)
    for leak in LEAKS:
        assert leak not in body, f"{leak!r} leaked into the page"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in response.headers
    return html.unescape(body)


def assert_answered(text: str) -> None:
    found = re.search(r"Predicted Class: [A-Z]+|\d+ white blood cells found", text)
    assert found or "No white blood cell found in this image." in text


def assert_still_serving(client) -> None:
    assert client.get("/").status_code == 200
    response = post(client, [("file", "plain.jpg", (CORPUS / "plain.jpg").read_bytes())])
    assert response.status_code == 200


def test_corpus_is_small_and_complete():
    files = {path.name for path in CORPUS.iterdir() if path.is_file()} - {"make_corpus.py", "manifest.json"}
    assert sum((CORPUS / name).stat().st_size for name in files) < 300 * 1024
    named = {case["file"] for case in MANIFEST["cases"] if case["file"]}
    assert named == files, "every corpus file has a case, and every case's file exists"


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=case_id)
def test_hostile_upload(client, case):
    files = []
    if case["file"] is not None:
        files = [(case["field"], case["upload_name"], (CORPUS / case["file"]).read_bytes())]
    response = post(client, files)
    assert response.status_code == case["status"], case
    text = assert_clean(response)
    assert case["message"] in text
    if "absent" in case:
        assert case["absent"] not in response.get_data(as_text=True)
    if "shown_size" in case:
        width, height = case["shown_size"]
        assert f'width="{width}" height="{height}"' in text
    if response.status_code != 200:
        assert 'role="alert"' in text and "Predict Blood Cell Type" in text  # back on the form, with the reason
    else:  # answered: a white cell's class, or the plain statement that there is none
        assert_answered(text)
    assert_still_serving(client)


def test_every_case_in_a_row_then_still_serving(client):
    """One app takes the whole corpus in a row (state left behind by one case must not break the next)."""
    for case in MANIFEST["cases"]:
        files = []
        if case["file"] is not None:
            files = [(case["field"], case["upload_name"], (CORPUS / case["file"]).read_bytes())]
        assert post(client, files).status_code == case["status"], case_id(case)
    assert_still_serving(client)


def test_over_the_byte_cap(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_CONTENT_LENGTH": 1 * MIB})
    client = app.test_client()
    response = post(client, [("file", "big.jpg", (CORPUS / "plain.jpg").read_bytes() + b"\0" * MIB)])
    assert response.status_code == 413
    assert "too large" in assert_clean(response)
    assert_still_serving(client)


def test_too_many_files(app, client):
    plain = (CORPUS / "plain.jpg").read_bytes()
    count = int(app.config["MAX_BATCH_FILES"]) + 1
    response = post(client, [("file", f"cell{i}.jpg", plain) for i in range(count)])
    assert response.status_code == 413
    assert "Too many files" in assert_clean(response)
    assert_still_serving(client)


def test_thousands_of_form_parts_are_refused(client):
    """Werkzeug's part limit (1,000) answers before any image is read."""
    response = post(client, [], {f"field{i}": "x" for i in range(1500)})
    assert response.status_code == 413
    assert_clean(response)
    assert_still_serving(client)


# --- fields that are hard for the white-cell detector: answered (no cell, or all cells), never a 5xx ------------


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def red_cells_only() -> bytes:
    """A 640x480 field of 80 red cells (pink discs with a paler centre) on a pale background, and no white cell."""
    rng = np.random.default_rng(3)
    image = Image.new("RGB", (640, 480), (236, 226, 214))
    draw = ImageDraw.Draw(image)
    for x, y in rng.integers(0, [640, 480], (80, 2)):
        draw.ellipse([x - 22, y - 22, x + 22, y + 22], fill=(214, 140, 150))
        draw.ellipse([x - 9, y - 9, x + 9, y + 9], fill=(226, 172, 176))
    return encode(image, quality=92)


def thirty_white_cells() -> bytes:
    """30 copies of the one-white-cell field's neighbourhood of its cell, 6 across and 5 down (840x600)."""
    tile = Image.open(FIELDS / "bccd_00001_one_wbc.jpg").convert("RGB").crop((20, 120, 160, 240))
    field = Image.new("RGB", (6 * 140, 5 * 120))
    for i in range(6):
        for j in range(5):
            field.paste(tile, (i * 140, j * 120))
    return encode(field, quality=92)


def forty_megapixels() -> bytes:
    """The two-white-cell field enlarged to 7296x5472 (39.9 MP, just under the app's 40 MP limit; ~1 MB as JPEG)."""
    field = Image.open(FIELDS / "bccd_00010_two_wbc.jpg").convert("RGB")
    return encode(field.resize((7296, 5472), Image.Resampling.BILINEAR), quality=80)


BAD_FIELDS = {
    "all-white": (lambda: encode(Image.new("RGB", (640, 480), "white"), "PNG"), 0),
    "all-black": (lambda: encode(Image.new("RGB", (640, 480), "black"), "PNG"), 0),
    "red-cells-only": (red_cells_only, 0),
    "thirty-white-cells": (thirty_white_cells, 30),
}


def post_api(client, name: str, data: bytes):
    fields = MultiDict([("file", FileStorage(io.BytesIO(data), name))])
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    return client.post("/api/predict", data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


@pytest.mark.parametrize("kind", BAD_FIELDS)
def test_hard_fields_are_answered_on_the_page_and_the_api(client, kind):
    make, cells = BAD_FIELDS[kind]
    data = make()
    (result,) = post_api(client, f"{kind}.jpg", data).get_json()["results"]
    assert len(result["cells"]) == result["cells_found"] == cells
    if cells == 0:
        assert (result["label"], result["uncertain"], result["reason"]) == (None, True, "no_white_cell_found")
    response = post(client, [("file", f"{kind}.jpg", data)])
    assert response.status_code == 200
    text = assert_clean(response)
    assert_answered(text)
    assert text.count('<g class="cell-box') == cells
    if cells:
        assert re.search(rf'<p class="predicted">{cells} white blood cells found</p>', text)
        assert len(re.findall(r'<span class="cell-number">\d+</span></th>', text)) == cells  # a row per cell
    else:
        assert "No white blood cell found in this image." in text


def test_a_forty_megapixel_field_is_answered_within_the_limits(client):
    data = forty_megapixels()
    assert len(data) < 16 * MIB  # within MAX_CONTENT_LENGTH
    (result,) = post_api(client, "big.jpg", data).get_json()["results"]
    assert len(result["cells"]) == 2
    scale = 7296 / 320
    truth = [(11, 114, 102, 210), (119, 126, 255, 235)]  # tests/data/fields/README.md, at 320x240
    for x0, y0, x1, y1 in (cell["box"] for cell in result["cells"]):
        cx, cy = (x0 + x1) / 2 / scale, (y0 + y1) / 2 / scale
        assert any(a <= cx <= c and b <= cy <= d for a, b, c, d in truth)  # in the uploaded image's pixels
    response = post(client, [("file", "big.jpg", data)])
    assert response.status_code == 200
    text = assert_clean(response)
    assert 'width="448" height="336"' in text and text.count('<g class="cell-box') == 2
