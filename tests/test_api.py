"""The JSON API through Flask's test client, with the tiny real Keras model (no mocks)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from app import create_app
from hematovision.imaging import prepare_bytes

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def post_files(client, files: list[tuple[str, bytes]], path: str = "/api/predict"):
    """POST files in the multipart field 'file', encoded in memory as an API client would send them."""
    fields = MultiDict([("file", FileStorage(io.BytesIO(data), name)) for name, data in files])
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    return client.post(path, data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


def model_probabilities(app, data: bytes) -> np.ndarray:
    return app.extensions["hematovision"].predict(prepare_bytes(data)[None])[0]


def assert_json_error(response, status: int, fragment: str = "") -> None:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["status"] == status
    assert fragment in error["message"]


def test_one_file_gives_a_list_of_one_result_as_the_model_says(app, client, make_image):
    data = make_image("PNG")
    response = post_files(client, [("cell.png", data)])
    assert response.status_code == 200
    (result,) = response.get_json()["results"]
    assert result["filename"] == "cell.png"
    assert list(result["probabilities"]) == LABELS
    expected = model_probabilities(app, data)
    # Rounded to 4 decimals: more digits would only be noise.
    assert all(p == round(p, 4) for p in result["probabilities"].values())
    assert np.allclose([result["probabilities"][label] for label in LABELS], expected, atol=5e-5 + 1e-6)
    assert result["label"] == LABELS[int(np.argmax(expected))]
    assert result["uncertain"] == (expected.max() < 0.6)


def test_a_batch_runs_once_and_keeps_order_and_per_file_errors(app, client, make_image):
    good = [make_image("PNG", size=(320, 240)), make_image("JPEG", size=(100, 300)), make_image("BMP", size=(64, 64))]
    files = [
        ("a.png", good[0]),
        ("bad.txt", b"not an image"),
        ("b.jpg", good[1]),
        ("empty.png", b""),
        ("c.bmp", good[2]),
    ]
    response = post_files(client, files)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in files]
    assert results[1] == {"filename": "bad.txt", "error": {"status": 415, "message": results[1]["error"]["message"]}}
    assert results[3]["error"]["status"] == 400
    for result, data in zip([results[0], results[2], results[4]], good, strict=True):
        expected = model_probabilities(app, data)  # the same figures as one image at a time
        assert np.allclose([result["probabilities"][label] for label in LABELS], expected, atol=5e-5 + 1e-5)


@pytest.mark.parametrize(("threshold", "flag"), [(0.0, False), (1.01, True)])
def test_uncertain_is_a_plain_threshold_on_the_top_probability(tiny_model_path, make_image, threshold, flag):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": threshold})
    (result,) = post_files(app.test_client(), [("cell.png", make_image())]).get_json()["results"]
    assert result["uncertain"] is flag


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


def test_openapi_document_is_valid_and_describes_the_answers(client, make_image):
    validators = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    from openapi_schema_validator import OAS31Validator

    document = client.get("/api/openapi.json").get_json()
    validators.validate(document)
    assert set(document["paths"]) == {"/api/predict", "/api/health", "/api/model", "/api/openapi.json"}

    def check(instance, schema_name):
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
        OAS31Validator(schema).validate(instance)

    answer = post_files(client, [("a.png", make_image()), ("bad.txt", b"nope")]).get_json()
    check(answer, "Results")
    check(client.get("/api/health").get_json(), "Health")
    check(post_files(client, [("bad.txt", b"nope")]).get_json(), "Error")
