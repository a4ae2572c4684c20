"""Hostile uploads (tests/data/hostile, see its make_corpus.py and manifest.json) posted to /predict: each gets
the right status and message, nothing internal leaks into the page, and the app keeps serving."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import pytest
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from app import create_app

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "data" / "hostile"
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
