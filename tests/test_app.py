"""End-to-end tests of the web app through Flask's test client, with a tiny real Keras model (no mocks)."""

from __future__ import annotations

import base64
import builtins
import html
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from werkzeug import formparser
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

import app as app_module
from app import create_app
from hematovision.batch import NO_WHITE_CELL_TEXT
from hematovision.classifier import ModelLoadError
from hematovision.imaging import prepare_field
from hematovision.web import GRADCAM_KEY, PROBABILITY_WORDS, in_words, probability_bands, rounded_percent

ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = ROOT / "model" / "blood_cell_model.h5"
SAMPLES = Path(__file__).resolve().parent / "data" / "samples"
SAMPLE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}
DISCLAIMER = "HematoVision is a research tool, not a medical device; do not use it for diagnosis."
MIB = 1024 * 1024
LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]  # the tiny test model's metadata (conftest)


def upload(client, data: bytes, filename: str = "cell.png", content_type: str = "application/octet-stream"):
    """POST a file as a browser's form would. The multipart body is encoded in memory: the test client
    would spool a big body to a temporary file of its own, which the disk-write spy would then see."""
    files = MultiDict({"file": FileStorage(io.BytesIO(data), filename, content_type=content_type)})
    body, _length, boundary = stream_encode_multipart(files, use_tempfile=False)
    content_type = f"multipart/form-data; boundary={boundary}"
    return client.post("/predict", data=body.getvalue(), content_type=content_type)


def page_text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def as_label(shown: str) -> str:
    """A class as the pages write it ("Neutrophil", "Alpha cell") -> the model's label (NEUTROPHIL, ALPHA_CELL)."""
    return shown.strip().upper().replace(" ", "_")


def predicted_label(response) -> str:
    match = re.search(r"Predicted Class: (.+?)(?:</p>| is only its best guess)", page_text(response))
    assert match, "no 'Predicted Class:' on the page"
    return as_label(match.group(1))


def shown_percentages(response) -> dict[str, float]:
    rows = re.findall(r'<th scope="row">([^<]+)</th>\s*<td class="num">([\d.]+)%</td>', page_text(response))
    return {as_label(label): float(percent) for label, percent in rows}


def assert_no_inline_code(text: str) -> None:
    """The CSP allows scripts and styles from this site only: the one script is static/app.js, nothing inline."""
    script = '<script src="/static/app.js" defer></script>'
    assert re.findall(r"<script[^>]*>.*?</script>", text, re.S) in ([], [script]) and text.count("<script") <= 1
    assert "style=" not in text and "<style" not in text and "onclick=" not in text
    assert not re.search(r'(src|href)="(https?:)?//', text)


def model_probabilities(app, data: bytes) -> np.ndarray | None:
    """What the loaded model itself says about the primary white cell of these bytes (its canonical crop), through
    the same preparation as the app; None when no white cell is found."""
    crop = prepare_field(data).primary_crop
    return None if crop is None else app.extensions["hematovision"].predict(crop[None])[0]


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (180, 90, 140)).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming a huge size but holding no pixels (a decompression-bomb stand-in)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def assert_home_with_error(response, status: int, message: str) -> None:
    assert response.status_code == status
    text = page_text(response)
    assert "Predict Blood Cell Type" in text  # back on the home page, form included
    alert = re.search(r'<div class="alert" role="alert"[^>]*>(.*?)</div>', text, re.S)
    assert alert, "no role=alert error message"
    assert message in alert.group(1)


# --- home page -----------------------------------------------------------------------------------------


def test_home_page_has_welcome_about_and_upload_form(client):
    response = client.get("/")
    assert response.status_code == 200
    text = page_text(response)
    assert "Welcome to HematoVision" in text
    assert "About Blood Cells" in text
    for cell in ("Neutrophils", "Lymphocytes", "Monocytes", "Eosinophils", "differential count"):
        assert cell in text
    assert "Predict Blood Cell Type" in text
    form = re.search(r"<form[^>]*>", text).group(0)
    assert 'method="post"' in form and 'action="/predict"' in form and 'enctype="multipart/form-data"' in form
    assert 'name="file"' in text and 'type="file"' in text
    assert 'accept=".jpg,.jpeg,.png,.bmp,.tif,.tiff,image/*"' in text
    assert '<label for="file">' in text and 'id="file"' in text
    assert re.search(r"<button[^>]*>Predict</button>", text)
    assert 'role="alert"' not in text
    for label in LABELS:
        assert label.lower() in text  # the classes offered come from the model's metadata
    # Every answer the app can give is said: a type, "uncertain", or no white cell found; never "will still be placed".
    about = " ".join(text[text.index("What HematoVision answers"):].split())
    assert '"uncertain"' in about and "says so and gives no type" in about and "still be placed" not in text


def test_the_forms_say_when_they_are_working_and_work_without_script(client):
    """static/app.js disables the button and says "Classifying..." while a form is sent; the forms are plain HTML
    forms that post without it."""
    text = client.get("/").get_data(as_text=True)
    assert '<script src="/static/app.js" defer></script>' in text
    forms = re.findall(r"<form[^>]*>", text)
    assert len(forms) == 2 and all("data-busy-text=" in form and 'method="post"' in form for form in forms)
    assert text.count('<p class="busy-status" role="status" aria-live="polite" hidden></p>') == 2
    script = client.get("/static/app.js")
    body = script.get_data(as_text=True)
    script.close()
    assert script.status_code == 200 and "javascript" in script.mimetype
    assert "Classifying..." in body and "preventDefault" in body and "pageshow" in body


def test_pages_use_no_external_resources_or_inline_styles_or_scripts(client, make_image):
    pages = [client.get("/"), upload(client, make_image()), client.get("/nowhere")]
    for response in pages:
        assert_no_inline_code(response.get_data(as_text=True))


def test_get_predict_redirects_home(client):
    response = client.get("/predict")
    assert response.status_code in (302, 303)
    assert response.headers["Location"] in ("/", "http://localhost/")


# --- successful predictions ----------------------------------------------------------------------------

GOOD_IMAGES = {
    "jpeg": lambda make: make("JPEG"),
    "png": lambda make: make("PNG"),
    "bmp": lambda make: make("BMP"),
    "tiff": lambda make: make("TIFF"),
    "png-rgba": lambda make: make("PNG", "RGBA"),
    "png-grayscale": lambda make: make("PNG", "L"),
    "png-palette": lambda make: make("PNG", "P"),
    "png-16-bit": lambda make: make("PNG", "I;16"),
    "jpeg-cmyk": lambda make: make("JPEG", "CMYK"),
    "jpeg-exif-rotated": lambda make: exif_rotated_jpeg(),
}


@pytest.mark.parametrize("kind", GOOD_IMAGES)
def test_upload_is_classified_as_the_model_says(app, client, make_image, kind):
    """Every accepted kind of image gets its answer through the one pipeline: its primary white cell's class, or
    the plain statement that there is none (the detector finds no white cell in some of these drawn gradients)."""
    data = GOOD_IMAGES[kind](make_image)
    response = upload(client, data)
    assert response.status_code == 200
    text = page_text(response)
    assert "Prediction Result" in text
    assert "Upload Another Image" in text and 'href="/"' in text
    assert DISCLAIMER in text

    probabilities = model_probabilities(app, data)
    if probabilities is None:
        assert NO_WHITE_CELL_TEXT + "." in text and "Predicted Class" not in text and not shown_percentages(response)
        return
    assert predicted_label(response) == LABELS[int(np.argmax(probabilities))]
    shown = shown_percentages(response)
    assert set(shown) == set(LABELS)
    for label, probability in zip(LABELS, probabilities, strict=True):
        assert shown[label] == pytest.approx(probability * 100, abs=0.051)
    assert sum(shown.values()) == pytest.approx(100, abs=0.3)


def test_labels_come_from_the_model_metadata(tiny_model_path, tmp_path, make_image):
    model_path = tmp_path / "renamed.h5"
    shutil.copy(tiny_model_path, model_path)
    labels = ["ALPHA_CELL", "BETA_CELL", "GAMMA_CELL", "DELTA_CELL"]
    model_path.with_suffix(".json").write_text(json.dumps({"labels": labels}), encoding="utf-8")
    client = create_app({"TESTING": True, "MODEL_PATH": str(model_path)}).test_client()

    response = upload(client, make_image())
    assert response.status_code == 200
    assert predicted_label(response) in labels
    assert set(shown_percentages(response)) == set(labels)
    assert not any(label in page_text(response) for label in LABELS)


def test_uploaded_image_is_shown_as_a_reencoded_thumbnail(client, make_image):
    data = make_image("PNG", size=(1000, 800))
    text = upload(client, data).get_data(as_text=True)
    match = re.search(r'<img class="result__image" src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)
    assert match, "the result page does not show the image as a data: URI"
    thumbnail = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    assert thumbnail.format == "JPEG"
    assert thumbnail.size == (448, 358)
    assert base64.b64encode(data).decode()[:200] not in text  # the raw upload is never echoed
    assert re.search(r'<img class="result__image"[^>]*alt="[^"]+"', text)


def test_filename_is_escaped(client, make_image):
    text = upload(client, make_image(), filename='<script>alert("x")</script>.png').get_data(as_text=True)
    assert "<script>" not in text
    assert "&lt;script&gt;" in text


# --- every white cell on the result page ----------------------------------------------------------------

FIELDS = Path(__file__).resolve().parent / "data" / "fields"
TWO_CELLS = (FIELDS / "bccd_00010_two_wbc.jpg").read_bytes()  # 320x240: a neutrophil and an eosinophil
ONE_CELL = (FIELDS / "bccd_00001_one_wbc.jpg").read_bytes()


def drawn_boxes(text: str) -> dict[int, tuple[float, float, float, float]]:
    """The numbered boxes of the SVG over the result image: {number: (x, y, width, height)} in its view box."""
    boxes = {}
    for number, body in re.findall(r'<g class="cell-box[^"]*" data-cell="(\d+)">(.*?)</g>', text, re.S):
        frame = re.search(r'<rect class="cell-box__frame" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" '
                          r'height="([\d.]+)"/>', body)
        assert re.search(rf'<text class="cell-box__number"[^>]*>{number}</text>', body), "the box carries its number"
        boxes[int(number)] = tuple(float(v) for v in frame.groups())
    return boxes


def test_a_field_with_two_white_cells_boxes_numbers_and_counts_them(tiny_model_path):
    # A threshold of 0: both cells are answered, so the image's differential counts them.
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    text = page_text(upload(app.test_client(), TWO_CELLS, filename="field.jpg"))
    assert re.search(r"<p class=\"predicted\">2 white blood cells found</p>", text)
    assert "Predicted Class" not in text  # no single answer for a field of several cells
    view = re.search(r'<svg class="cell-boxes" viewBox="0 0 (\d+) (\d+)"', text)
    assert view and (int(view.group(1)), int(view.group(2))) == (448, 336)  # the image's 320x240 at 448 wide
    prepared = prepare_field(TWO_CELLS)
    order = sorted(range(2), key=lambda i: prepared.cells[i].centre[0])  # side by side: numbered left to right
    scale = 448 / 320
    boxes = drawn_boxes(text)
    assert sorted(boxes) == [1, 2]
    for number, index in enumerate(order, start=1):
        x0, y0, x1, y1 = prepared.cells[index].box
        assert boxes[number] == pytest.approx((x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale), abs=0.1)

    probabilities = app.extensions["hematovision"].predict(prepared.crops[order])
    rows = re.findall(r'<th scope="row" class="num"><span class="cell-number">(\d)</span></th>\s*<td>(.*?)</td>\s*'
                      r'<td class="num">([\d.]+)%', text, re.S)
    assert [number for number, _, _ in rows] == ["1", "2"]
    for (_, answer, percent), row in zip(rows, probabilities, strict=True):
        assert f"<strong>{LABELS[int(np.argmax(row))].capitalize()}</strong>" in answer
        assert float(percent) == pytest.approx(row.max() * 100, abs=0.051)
    assert "Differential count of this image" in text
    counts = re.search(r'<table class="data-table differential">(.*?)</table>', text, re.S).group(1)
    counted = dict(re.findall(r'<th scope="row">([A-Za-z]+)</th>\s*<td class="num">(\d+)</td>', counts))
    assert {as_label(label): int(n) for label, n in counted.items() if int(n)} == dict(
        Counter(LABELS[int(np.argmax(row))] for row in probabilities))
    assert "Over the 2 cells of 2 given a type" in " ".join(text.split())
    summary = re.search(r'<p class="summary">(.*?)</p>', text, re.S).group(1)  # the answer first, in words
    assert summary == ", ".join(f"{n} {label.lower()}{'' if n == 1 else 's'}" for label, n in sorted(
        Counter(LABELS[int(np.argmax(row))] for row in probabilities).items())) + "."
    assert text.count("<caption>Cell ") == 2  # every class's probability, cell by cell, folded


def test_uncertain_cells_of_a_field_are_marked_with_the_reason(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 1.01})
    text = page_text(upload(app.test_client(), TWO_CELLS))
    assert len(re.findall(r'<g class="cell-box cell-box--uncertain"', text)) == 2  # dashed boxes
    assert text.count("<strong>Uncertain</strong>: low confidence") == 2 and "not trusted" in text
    assert "Over the 0 cells of 2 given a type" in " ".join(text.split())
    assert '<p class="summary">2 uncertain.</p>' in text
    assert '<table class="data-table differential">' not in text


def test_one_white_cell_reads_like_a_single_answer_with_its_box(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    response = upload(app.test_client(), ONE_CELL)
    text = page_text(response)
    answer = text[text.index('class="card result__answer"'):]
    assert re.match(r'[^<]*>\s*<h2[^>]*>Answer</h2>\s*<p class="predicted">Predicted Class: [A-Z][a-z]+</p>', answer)
    expected = model_probabilities(app, ONE_CELL)
    assert predicted_label(response) == LABELS[int(np.argmax(expected))]
    words = re.search(r'<p class="confidence"><span class="words words--[a-z-]+">([A-Za-z ]+)</span>\s*\((\d+)%\)',
                      answer)
    assert words, "the probability is said in words, with its percent"
    assert words.group(1).lower() == in_words(float(expected.max()))
    # The answer comes before the picture, the details after it.
    assert text.index("result__answer") < text.index("result__figure") < text.index("result__details")
    assert "One white blood cell found in the image; it is boxed." in text
    ((x0, y0, x1, y1),) = [cell.box for cell in prepare_field(ONE_CELL).cells]
    assert drawn_boxes(text) == {1: pytest.approx((x0 * 1.4, y0 * 1.4, (x1 - x0) * 1.4, (y1 - y0) * 1.4), abs=0.1)}
    assert "Differential count" not in text


@pytest.mark.parametrize("colour", ["white", "black"])
def test_no_white_cell_is_said_in_words_without_a_class(client, colour):
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), colour).save(buffer, format="PNG")
    response = upload(client, buffer.getvalue(), filename="blank.png")
    assert response.status_code == 200
    text = page_text(response)
    assert "No white blood cell found in this image." in text
    assert "Predicted Class" not in text and "cell-box" not in text
    answer = text[text.index('class="card result__answer"'):]
    assert not any(label in answer or label.capitalize() in answer for label in LABELS)  # never a made-up class
    assert re.search(r'<img class="result__image" src="data:image/jpeg;base64,', text)  # the image is still shown


def test_cells_per_image_are_capped_and_the_page_says_so(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_CELLS_PER_IMAGE": 1})
    text = " ".join(page_text(upload(app.test_client(), TWO_CELLS)).split())
    assert "This image holds 2 white cells; HematoVision classified the 1 nearest its centre." in text
    assert "Predicted Class:" in text and text.count('<g class="cell-box') == 1


# --- bad input -----------------------------------------------------------------------------------------


def webp_bytes(make):
    return make("WEBP", size=(32, 32))


BAD_UPLOADS = {
    "empty-file": (lambda make: b"", 400, "The file is empty."),
    "text": (lambda make: b"just some text, not an image\n", 415, "not an image we can read"),
    "svg": (
        lambda make: b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        415,
        "not an image we can read",
    ),
    "gif": (lambda make: make("GIF", size=(32, 32)), 415, "GIF images are not supported"),
    "webp": (webp_bytes, 415, "WEBP images are not supported"),
    "truncated-jpeg": (lambda make: make("JPEG")[:2000], 400, "damaged or incomplete"),
    "too-many-pixels": (lambda make: png_header_only(9000, 9000), 413, "too many pixels"),
}


def test_an_upload_error_names_the_file(client, make_image):
    assert_home_with_error(upload(client, make_image("JPEG")[:2000], filename="photo.jpg"), 400,
                           "photo.jpg: The image is damaged or incomplete")
    assert_home_with_error(upload(client, b"text", filename="notes.txt"), 415, "notes.txt: This file is not an image")


def test_missing_file_field_is_refused(client):
    assert_home_with_error(client.post("/predict", data={}), 400, "No file was sent")


def test_no_file_selected_is_refused(client):
    # What a browser sends when the form is submitted with no file chosen.
    response = client.post("/predict", data={"file": (io.BytesIO(b""), "")})
    assert_home_with_error(response, 400, "No file was selected")


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_bad_upload_returns_home_with_error(client, make_image, kind):
    make_data, status, message = BAD_UPLOADS[kind]
    assert_home_with_error(upload(client, make_data(make_image)), status, message)


def test_upload_over_max_content_length_is_refused(client):
    response = upload(client, b"\0" * (16 * MIB + 1), filename="huge.png")
    assert_home_with_error(response, 413, "The file is too large. The limit is 16 MB.")


def test_server_keeps_serving_after_bad_input(client, make_image):
    for make_data, status, _ in BAD_UPLOADS.values():
        assert upload(client, make_data(make_image)).status_code == status
    assert upload(client, b"\0" * (16 * MIB + 1)).status_code == 413
    assert client.post("/predict", data={}).status_code == 400
    response = upload(client, make_image("JPEG"))
    assert response.status_code == 200
    assert predicted_label(response) in LABELS


# --- nothing written to disk ---------------------------------------------------------------------------


@pytest.fixture
def disk_writes(monkeypatch):
    """Record every temporary file and every file opened for writing while the fixture is active."""
    writes: list[str] = []

    def spy(name, original):
        def recorded(*args, **kwargs):
            writes.append(name)
            return original(*args, **kwargs)

        return recorded

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, spy(name, getattr(tempfile, name)))
    original_open = builtins.open

    def open_spy(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            writes.append(f"open({file!r}, {mode!r})")
        return original_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_spy)
    return writes


def test_upload_is_never_written_to_disk(app, client, disk_writes):
    # Control: the spy does see Werkzeug's default, which spools uploads over 500 KB to a temporary file.
    spool = formparser.default_stream_factory(total_content_length=2 * MIB, content_type=None, filename="x")
    spool.write(b"\0" * 600_000)
    spool.close()
    assert disk_writes == ["TemporaryFile"]
    disk_writes.clear()

    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=1)
    assert len(buffer.getvalue()) > 1 * MIB  # well over Werkzeug's spooling threshold
    instance_before = sorted(Path(app.instance_path).rglob("*")) if Path(app.instance_path).exists() else []

    response = upload(client, buffer.getvalue())
    assert response.status_code == 200
    assert disk_writes == []
    instance_after = sorted(Path(app.instance_path).rglob("*")) if Path(app.instance_path).exists() else []
    assert instance_after == instance_before
    assert "UPLOAD_FOLDER" not in app.config


# --- model loading and startup -------------------------------------------------------------------------


def test_missing_model_stops_the_app_with_a_clear_message(tmp_path):
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(ModelLoadError, match="Model file not found") as caught:
        create_app({"TESTING": True, "MODEL_PATH": str(missing)})
    assert str(missing) in str(caught.value)


def test_model_without_metadata_stops_the_app(tiny_model_path, tmp_path):
    model_path = tmp_path / "lonely.h5"
    shutil.copy(tiny_model_path, model_path)
    with pytest.raises(ModelLoadError, match="metadata not found"):
        create_app({"TESTING": True, "MODEL_PATH": str(model_path)})


def test_unreadable_model_stops_the_app(tmp_path):
    model_path = tmp_path / "broken.h5"
    model_path.write_bytes(b"this is not an HDF5 file")
    model_path.with_suffix(".json").write_text(json.dumps({"labels": LABELS}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="Could not load the model"):
        create_app({"TESTING": True, "MODEL_PATH": str(model_path)})


def test_model_path_can_come_from_the_environment(tiny_model_path, monkeypatch):
    monkeypatch.setenv("FLASK_MODEL_PATH", str(tiny_model_path))
    app = create_app()
    assert Path(app.extensions["hematovision"].path) == Path(tiny_model_path)
    assert app.config["MAX_CONTENT_LENGTH"] == 16 * MIB
    assert app.config["MAX_IMAGE_PIXELS"] == 40_000_000
    assert app.config["SECRET_KEY"]


def test_running_without_a_model_exits_with_a_message_not_a_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FLASK_MODEL_PATH": str(tmp_path / "missing.h5")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py")], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )
    assert result.returncode != 0
    assert "Model file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_serves_with_the_given_host_and_port(tiny_model_path, monkeypatch):
    served = {}

    def record_serve(app, host, port):
        served.update(app=app, host=host, port=port)

    monkeypatch.setenv("FLASK_MODEL_PATH", str(tiny_model_path))
    monkeypatch.setattr(app_module, "serve", record_serve)
    assert app_module.main(["--host", "0.0.0.0", "--port", "5999"]) == 0
    assert (served["host"], served["port"]) == ("0.0.0.0", 5999)
    assert served["app"].debug is False


def test_default_host_and_port(monkeypatch):
    monkeypatch.delenv("FLASK_RUN_HOST", raising=False)
    monkeypatch.delenv("FLASK_RUN_PORT", raising=False)
    args = app_module.parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 5000)
    monkeypatch.setenv("FLASK_RUN_PORT", "8080")
    assert app_module.parse_args([]).port == 8080


# --- headers and error pages ---------------------------------------------------------------------------

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
}


def test_security_headers_on_every_kind_of_response(client, make_image):
    responses = [
        client.get("/"),
        upload(client, make_image()),
        upload(client, b"not an image"),
        client.get("/static/style.css"),
        client.get("/does-not-exist"),
    ]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.request.path, name)
        response.close()


def test_result_page_is_not_cached(client, make_image):
    assert upload(client, make_image()).headers["Cache-Control"] == "no-store"


def test_not_found_page_is_friendly(client):
    response = client.get("/no/such/page")
    assert response.status_code == 404
    text = page_text(response)
    assert "Page not found" in text and 'href="/"' in text
    assert "Traceback" not in text and "werkzeug" not in text.lower()


def test_wrong_method_gets_a_friendly_405(client):
    response = client.put("/predict")
    assert response.status_code == 405
    assert "Not allowed" in page_text(response)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_unexpected_error_gives_a_generic_500_page_and_is_logged(tiny_model_path, make_image, caplog):
    app = create_app({"TESTING": True, "PROPAGATE_EXCEPTIONS": False, "MODEL_PATH": str(tiny_model_path)})

    def broken_predict(batch):
        raise RuntimeError("secret internal detail")

    app.extensions["hematovision"].run = broken_predict  # the model call behind predict() and assess()
    response = upload(app.test_client(), make_image())
    assert response.status_code == 500
    text = page_text(response)
    assert "Something went wrong" in text
    assert "secret internal detail" not in text and "Traceback" not in text
    assert "Predicted Class" not in text
    logged = [str(record.exc_info) for record in caplog.records if record.exc_info]
    assert any("secret internal detail" in text for text in logged)
    assert app.test_client().get("/").status_code == 200


# --- the real shipped model ----------------------------------------------------------------------------


def sample_images() -> list[tuple[str, Path]]:
    if not SAMPLES.is_dir():
        return []
    return [
        (folder.name.upper(), path)
        for folder in sorted(p for p in SAMPLES.iterdir() if p.is_dir())
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in SAMPLE_SUFFIXES
    ]


@pytest.mark.slow
def test_real_model_classifies_most_sample_images_correctly():
    if not REAL_MODEL.is_file():
        pytest.skip(f"the shipped model {REAL_MODEL.relative_to(ROOT)} is not there yet")
    samples = sample_images()
    if not samples:
        pytest.skip(f"no sample images under {SAMPLES.relative_to(ROOT)}/<CLASS>/")
    app = create_app({"TESTING": True, "MODEL_PATH": str(REAL_MODEL)})
    labels = app.extensions["hematovision"].labels
    client = app.test_client()

    correct, wrong = 0, []
    for expected, path in samples:
        assert expected in labels, f"sample folder {expected} is not one of the model's classes {labels}"
        response = upload(client, path.read_bytes(), filename=path.name)
        assert response.status_code == 200, path
        if predicted_label(response) == expected:
            correct += 1
        else:
            wrong.append(f"{path.relative_to(SAMPLES)} -> {predicted_label(response)}")
    assert correct >= 0.75 * len(samples), f"{correct}/{len(samples)} correct; wrong: {wrong}"


# --- a lab's words -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("probability", "words"), [
    (1.0, "almost certain"), (0.95, "almost certain"), (0.9499, "likely"), (0.80, "likely"), (0.7999, "possible"),
    (0.60, "possible"), (0.5999, "unsure"), (0.37, "unsure"), (0.0, "unsure"),
])
def test_a_calibrated_probability_is_said_in_fixed_bands(probability, words):
    assert in_words(probability) == words


def test_the_bands_are_set_in_one_place_and_explained_on_the_model_card(client):
    assert [words for _, words in PROBABILITY_WORDS] == ["almost certain", "likely", "possible", "unsure"]
    assert probability_bands() == [(0.95, 1.0, "almost certain"), (0.80, 0.95, "likely"), (0.60, 0.80, "possible"),
                                   (0.0, 0.60, "unsure")]
    text = " ".join(page_text(client.get("/model")).split())
    for row in ("Almost certain</th> <td>95% or more", "Likely</th> <td>80% to 95%", "Possible</th> <td>60% to 80%",
                "Unsure</th> <td>under 60%"):
        assert row in text


@pytest.mark.parametrize(("probability", "shown"), [(0.996, ">99%"), (1.0, "100%"), (0.874, "87%"), (0.004, "<1%"),
                                                    (0.0, "0%")])
def test_a_percent_in_words_is_never_rounded_up_to_a_certainty(probability, shown):
    assert rounded_percent(probability) == shown


# --- the first heatmap -----------------------------------------------------------------------------------


def preparing_threads() -> list:
    import threading

    return [thread for thread in threading.enumerate() if thread.name == "prepare-heatmap"]


def test_the_heatmap_is_prepared_in_the_background_after_the_first_page(tiny_model_path):
    """Keras is loaded and the heatmap traced in a daemon thread, once the first page is answered: create_app and the
    first page do not wait for it, and the first heatmap asked for then costs no more than the others."""
    before = set(preparing_threads())
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "PREPARE_HEATMAP_IN_BACKGROUND": True})
    (thread,) = set(preparing_threads()) - before
    assert thread.daemon and GRADCAM_KEY not in app.extensions  # still waiting for the first page
    assert app.test_client().get("/").status_code == 200
    thread.join(timeout=300)
    assert not thread.is_alive() and GRADCAM_KEY in app.extensions


def test_the_tests_do_not_prepare_the_heatmap_unless_asked(tiny_model_path):
    before = set(preparing_threads())
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)})
    assert set(preparing_threads()) == before and GRADCAM_KEY not in app.extensions
    assert app.config["PREPARE_HEATMAP_IN_BACKGROUND"] is None  # the default: prepare unless TESTING


def test_one_uncertain_cell_gets_no_type_and_its_best_guess_is_said_to_be_one(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 1.01})
    response = upload(app.test_client(), ONE_CELL)
    text = page_text(response)
    assert '<p class="predicted predicted--uncertain">Answer: Uncertain, no cell type given</p>' in text
    assert "Why: low confidence." in text and "is only its best guess" in text and "identify this cell by eye" in text
    assert predicted_label(response) == LABELS[int(np.argmax(model_probabilities(app, ONE_CELL)))]
