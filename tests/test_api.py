"""The JSON API through Flask's test client, with the tiny real Keras model (no mocks)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from app import create_app
from hematovision.batch import NO_WHITE_CELL
from hematovision.imaging import prepare_field

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
FIELDS = Path(__file__).resolve().parent / "data" / "fields"
TWO_CELLS = (FIELDS / "bccd_00010_two_wbc.jpg").read_bytes()  # a neutrophil and an eosinophil, 320x240
ONE_CELL = (FIELDS / "bccd_00001_one_wbc.jpg").read_bytes()


def post_files(client, files: list[tuple[str, bytes]], path: str = "/api/predict"):
    """POST files in the multipart field 'file', encoded in memory as an API client would send them."""
    fields = MultiDict([("file", FileStorage(io.BytesIO(data), name)) for name, data in files])
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    return client.post(path, data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


def blank_png(colour="white", size=(320, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_cells(app, data: bytes) -> tuple[list[tuple[int, int, int, int]], np.ndarray, int | None]:
    """What the pipeline itself says about these bytes: the white cells' boxes, the model's probabilities for each
    cell's crop, and the primary cell's index."""
    prepared = prepare_field(data)
    probabilities = app.extensions["hematovision"].predict(prepared.crops) if prepared.cells else np.zeros((0, 4))
    return [cell.box for cell in prepared.cells], probabilities, prepared.primary


def assert_json_error(response, status: int, fragment: str = "") -> None:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["status"] == status
    assert fragment in error["message"]


def assert_cells_as_the_pipeline_says(app, result: dict, data: bytes) -> None:
    """`cells` lists every white cell the detector finds, each with its box and the model's answer for its crop;
    the top level repeats the primary cell's (nearest the image centre)."""
    boxes, probabilities, primary = expected_cells(app, data)
    by_box = {tuple(cell["box"]): cell for cell in result["cells"]}
    assert set(by_box) == set(boxes) and len(result["cells"]) == len(boxes)
    assert result["cells_found"] == len(boxes)
    for box, expected in zip(boxes, probabilities, strict=True):
        cell = by_box[box]
        assert all(isinstance(v, int) for v in cell["box"])
        assert list(cell["probabilities"]) == LABELS
        assert all(p == round(p, 4) for p in cell["probabilities"].values())  # 4 decimals: more would be noise
        assert np.allclose([cell["probabilities"][label] for label in LABELS], expected, atol=5e-5 + 1e-6)
        assert cell["label"] == LABELS[int(np.argmax(expected))]
        assert cell["uncertain"] == (cell["reason"] is not None)
    top = result["cells"][result["primary"]]
    assert tuple(top["box"]) == boxes[primary]
    for key in ("label", "probabilities", "uncertain", "reason"):
        assert result[key] == top[key]


def test_a_field_with_two_white_cells_lists_both_and_answers_for_the_primary(app, client):
    response = post_files(client, [("field.jpg", TWO_CELLS)])
    assert response.status_code == 200
    (result,) = response.get_json()["results"]
    assert result["filename"] == "field.jpg"
    assert len(result["cells"]) == 2
    assert_cells_as_the_pipeline_says(app, result, TWO_CELLS)
    # The primary cell is the one whose box centre is nearest the image centre (160, 120).
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in (c["box"] for c in result["cells"])]
    distances = [np.hypot(x - 160, y - 120) for x, y in centres]
    assert result["primary"] == int(np.argmin(distances))
    # Numbered in reading order: the two cells sit side by side, so left first.
    assert centres[0][0] < centres[1][0]


def test_each_box_holds_an_annotated_white_cell(client):
    """The committed fields' annotated WBC boxes (tests/data/fields/README.md): each found box's centre lies in
    a true box, each true box once."""
    truth = {"two": [(11, 114, 102, 210), (119, 126, 255, 235)], "one": [(34, 157, 143, 240)]}
    results = post_files(client, [("two", TWO_CELLS), ("one", ONE_CELL)]).get_json()["results"]
    for result in results:
        boxes = truth[result["filename"]]
        matched = set()
        for x0, y0, x1, y1 in (cell["box"] for cell in result["cells"]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            hits = [i for i, (a, b, c, d) in enumerate(boxes) if a <= cx <= c and b <= cy <= d and i not in matched]
            assert hits, (result["filename"], (x0, y0, x1, y1))
            matched.add(hits[0])
        assert matched == set(range(len(boxes)))


@pytest.mark.parametrize("colour", ["white", "black"])
def test_no_white_cell_is_said_so_and_never_given_a_class(client, colour):
    (result,) = post_files(client, [("blank.png", blank_png(colour))]).get_json()["results"]
    assert result == {
        "filename": "blank.png",
        "label": None,
        "probabilities": None,
        "uncertain": True,
        "reason": NO_WHITE_CELL,
        "primary": None,
        "cells_found": 0,
        "cells": [],
    }


def test_a_batch_keeps_order_and_per_file_errors(app, client, make_image):
    good = [TWO_CELLS, make_image("JPEG", size=(100, 300)), ONE_CELL, blank_png()]
    files = [
        ("a.jpg", good[0]),
        ("bad.txt", b"not an image"),
        ("b.jpg", good[1]),
        ("empty.png", b""),
        ("c.jpg", good[2]),
        ("d.png", good[3]),
    ]
    response = post_files(client, files)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in files]
    assert results[1] == {"filename": "bad.txt", "error": {"status": 415, "message": results[1]["error"]["message"]}}
    assert results[3]["error"]["status"] == 400
    for result, data in zip([results[0], results[2], results[4], results[5]], good, strict=True):
        if data is good[3]:
            assert result["cells"] == [] and result["reason"] == NO_WHITE_CELL
        else:  # the same figures as one image at a time
            assert_cells_as_the_pipeline_says(app, result, data)


def test_cells_per_image_are_capped_and_the_count_found_is_said(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_CELLS_PER_IMAGE": 1})
    (result,) = post_files(app.test_client(), [("field.jpg", TWO_CELLS)]).get_json()["results"]
    boxes, _, primary = expected_cells(app, TWO_CELLS)
    assert result["cells_found"] == 2 and len(result["cells"]) == 1
    assert tuple(result["cells"][0]["box"]) == boxes[primary] and result["primary"] == 0  # the central one is kept


@pytest.mark.parametrize(("threshold", "flag"), [(0.0, False), (1.01, True)])
def test_uncertain_is_a_plain_threshold_on_the_top_probability(tiny_model_path, threshold, flag):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": threshold})
    (result,) = post_files(app.test_client(), [("field.jpg", TWO_CELLS)]).get_json()["results"]
    assert result["uncertain"] is flag
    assert [cell["uncertain"] for cell in result["cells"]] == [flag, flag]


def test_no_file_is_a_json_400(client):
    assert_json_error(client.post("/api/predict"), 400, "'file'")


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"", 400), (b"GIF89a not really", 415), (b"hello, world", 415)],
)
def test_one_bad_file_fails_the_request_with_its_own_status(client, data, status):
    assert_json_error(post_files(client, [("x.bin", data)]), status)


def test_damaged_image_is_a_json_400(client, make_image):
    assert_json_error(post_files(client, [("cut.png", make_image("PNG")[:200])]), 400, "damaged")


def test_too_many_files_is_refused_with_a_clear_message(tiny_model_path, make_image):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_BATCH_FILES": 2})
    response = post_files(app.test_client(), [(f"{i}.png", make_image()) for i in range(3)])
    assert_json_error(response, 413, "The limit is 2 per request")


def test_request_over_max_content_length_is_a_json_413(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_CONTENT_LENGTH": 1024})
    assert_json_error(post_files(app.test_client(), [("big.png", b"\0" * 4096)]), 413, "too large")


def test_unknown_api_path_and_wrong_method_are_json(client):
    assert_json_error(client.get("/api/nothing-here"), 404)
    response = client.get("/api/predict")
    assert_json_error(response, 405)
    assert "POST" in response.headers["Allow"]
    # Pages keep their HTML error pages.
    page = client.get("/nothing-here")
    assert page.status_code == 404 and page.mimetype == "text/html"


def test_health_reports_the_model_version(client):
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    # The tiny model's metadata has no 'created': the version is the file's SHA-256 prefix.
    assert body["model_version"].startswith("sha256:") and len(body["model_version"]) == len("sha256:") + 12


def test_health_uses_the_metadata_creation_date_when_there_is_one(tiny_model_path, tmp_path):
    import json
    import shutil

    model = tmp_path / "m.h5"
    shutil.copy(tiny_model_path, model)
    meta = json.loads(tiny_model_path.with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps({**meta, "created": "2026-01-02T03:04:05+00:00"}))
    app = create_app({"TESTING": True, "MODEL_PATH": str(model)})
    assert app.test_client().get("/api/health").get_json()["model_version"] == "2026-01-02T03:04:05+00:00"


def test_model_endpoint_returns_the_metadata(app, client):
    assert client.get("/api/model").get_json() == app.extensions["hematovision"].metadata


def test_model_endpoint_shows_no_path_of_the_training_machine(tiny_model_path, tmp_path):
    import json
    import re
    import shutil

    model = tmp_path / "m.h5"
    shutil.copy(tiny_model_path, model)
    meta = json.loads(tiny_model_path.with_suffix(".json").read_text())
    meta["training"] = {
        "command": "python training/train.py --data-dir /tmp/kaggle --out /tmp/abl/G/blood_cell_model.h5 --seed 1",
        "data_dir": "/home/someone/data/TRAIN/",
        "pbc": {"dir": "C:\\Users\\lab\\pbc", "share": "1 / 4 of the set"},
        "relative": "../shared/data/pbc-4class and model/ablation.json",
        "url": "https://example.org/a/b",
    }
    model.with_suffix(".json").write_text(json.dumps(meta))
    app = create_app({"TESTING": True, "MODEL_PATH": str(model)})
    served = app.test_client().get("/api/model").get_json()
    assert served["training"] == {
        "command": "python training/train.py --data-dir kaggle --out blood_cell_model.h5 --seed 1",
        "data_dir": "TRAIN",
        "pbc": {"dir": "pbc", "share": "1 / 4 of the set"},
        "relative": "../shared/data/pbc-4class and model/ablation.json",
        "url": "https://example.org/a/b",
    }
    assert served["labels"] == LABELS
    assert not re.search(r"(^|[\s=\"])(/|[A-Za-z]:\\)\w", json.dumps(served))


def test_api_responses_carry_the_security_headers(client):
    response = client.get("/api/health")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_openapi_document_is_valid_and_describes_the_answers(client):
    validators = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    from jsonschema.exceptions import ValidationError
    from openapi_schema_validator import OAS31Validator

    document = client.get("/api/openapi.json").get_json()
    validators.validate(document)
    assert set(document["paths"]) == {"/api/predict", "/api/health", "/api/model", "/api/openapi.json"}

    def check(instance, schema_name):
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
        OAS31Validator(schema).validate(instance)

    answer = post_files(client, [("a.jpg", TWO_CELLS), ("blank.png", blank_png()), ("bad.txt", b"nope")]).get_json()
    assert [len(r.get("cells", [])) for r in answer["results"]] == [2, 0, 0]
    check(answer, "Results")
    check(client.get("/api/health").get_json(), "Health")
    check(post_files(client, [("bad.txt", b"nope")]).get_json(), "Error")
    prediction = document["components"]["schemas"]["Prediction"]
    assert {"cells", "primary", "cells_found"} <= set(prediction["required"])
    assert NO_WHITE_CELL in prediction["properties"]["reason"]["enum"]
    cell = answer["results"][0]["cells"][0]
    cell["box"] = [1.5, 2, 3, 4]  # boxes are whole pixels
    with pytest.raises(ValidationError):
        check(answer, "Results")
