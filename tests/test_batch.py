"""Several images at once: the batch module, and the batch result page posted from the home page's form."""

from __future__ import annotations

import base64
import csv
import html
import io
import re

import numpy as np
import pytest
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from app import create_app
from hematovision.batch import ItemResult, classify_files, count_differential, write_csv
from hematovision.imaging import ImageRejected, prepare_bytes

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def post_files(client, files: list[tuple[str, bytes]]):
    fields = MultiDict([("file", FileStorage(io.BytesIO(data), name)) for name, data in files])
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    return client.post("/predict", data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


def result(label: str, top: float = 0.9, uncertain: bool = False, name: str = "x.png") -> ItemResult:
    rest = (1 - top) / (len(LABELS) - 1)
    probabilities = {other: (top if other == label else rest) for other in LABELS}
    return ItemResult(filename=name, probabilities=probabilities, label=label, uncertain=uncertain)


# --- hematovision.batch ----------------------------------------------------------------------------


def test_classify_files_matches_one_at_a_time_and_keeps_order(app, make_image):
    classifier = app.extensions["hematovision"]
    images = [make_image("PNG", size=(320, 240)), make_image("JPEG", size=(90, 200))]
    results = classify_files(classifier, [("a", images[0]), ("b", b"junk"), ("c", images[1])], thumbnail_side=50)
    assert [r.filename for r in results] == ["a", "b", "c"]
    assert isinstance(results[1].error, ImageRejected) and results[1].error.status == 415
    for r, data in zip([results[0], results[2]], images, strict=True):
        expected = classifier.predict(prepare_bytes(data)[None])[0]
        assert np.allclose([r.probabilities[label] for label in LABELS], expected, atol=1e-5)
        assert r.label == LABELS[int(np.argmax(expected))]
        assert max(r.thumbnail.size) <= 50  # only a thumbnail is kept, not the full decoded image


def test_classify_files_with_only_bad_files_does_not_call_the_model(app):
    results = classify_files(app.extensions["hematovision"], [("a", b""), ("b", b"junk")])
    assert [r.error.status for r in results] == [400, 415]


def test_differential_counts_only_confident_images_and_flags_ranges():
    results = [result("NEUTROPHIL")] * 5 + [result("LYMPHOCYTE")] * 4 + [result("MONOCYTE")]
    results += [result("EOSINOPHIL", 0.4, uncertain=True, name="unsure.png")]
    results += [ItemResult(filename="bad.txt", error=ImageRejected(415, "not an image"))]
    diff = count_differential(results, LABELS)
    assert diff.counted == 10
    rows = {row.label: row for row in diff.rows}
    assert (rows["NEUTROPHIL"].count, rows["NEUTROPHIL"].percent, rows["NEUTROPHIL"].flag) == (5, 50.0, "")
    assert (rows["LYMPHOCYTE"].percent, rows["LYMPHOCYTE"].flag) == (40.0, "")  # the range is inclusive
    assert (rows["MONOCYTE"].percent, rows["MONOCYTE"].flag) == (10.0, "high")
    assert (rows["EOSINOPHIL"].count, rows["EOSINOPHIL"].flag) == (0, "low")  # the uncertain one is not counted
    assert [r.filename for r in diff.uncertain] == ["unsure.png"]
    assert [r.filename for r in diff.rejected] == ["bad.txt"]


def test_csv_has_a_row_per_file_and_defuses_formulas():
    results = [result("MONOCYTE", 0.7, name="=HYPERLINK(1).png"), ItemResult("b.txt", error=ImageRejected(415, "no"))]
    rows = list(csv.reader(io.StringIO(write_csv(results, LABELS))))
    assert rows[0] == ["filename", "label", "probability", "uncertain", "reason", *LABELS, "error"]
    assert rows[1][:5] == ["'=HYPERLINK(1).png", "MONOCYTE", "0.7000", "no", ""]
    assert rows[2][0] == "b.txt" and rows[2][-1] == "no"


# --- the batch page --------------------------------------------------------------------------------


def page_text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def test_home_form_accepts_several_files(client):
    text = page_text(client.get("/"))
    tag = re.search(r'<input id="file"[^>]*>', text, re.S).group(0)
    assert " multiple" in tag and 'name="file"' in tag


def test_several_files_give_the_batch_page(tiny_model_path, make_image):
    # A threshold of 0 counts every image, so the count table with its reference ranges is shown.
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    client = app.test_client()
    images = [make_image("PNG", size=(320, 240)), make_image("JPEG", size=(200, 90)), make_image("PNG", size=(50, 50))]
    files = [("one.png", images[0]), ("two.jpg", images[1]), ("junk.txt", b"nope"), ("three.png", images[2])]
    response = post_files(client, files)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    text = page_text(response)
    assert "Batch Result" in text and "Differential count" in text
    assert len(re.findall(r'<img class="batch-table__thumb" src="data:image/jpeg;base64,', text)) == 3
    for name, data in zip(["one.png", "two.jpg", "three.png"], images, strict=True):
        label = LABELS[int(np.argmax(app.extensions["hematovision"].predict(prepare_bytes(data)[None])[0]))]
        assert re.search(rf"<td[^>]*>{re.escape(name)}</td>\s*<td>{label}</td>", text)
    assert "Refused (1)" in text and "junk.txt" in text
    for reference in ("40–60%", "20–40%", "2–8%", "1–4%"):
        assert reference in text


def test_batch_page_offers_the_results_as_csv(client, make_image):
    text = page_text(post_files(client, [("a.png", make_image()), ("b.png", make_image(size=(99, 77)))]))
    link = re.search(
        r'<a class="button" href="data:text/csv;charset=utf-8;base64,([^"]+)" '
        r'download="hematovision_results.csv">',
        text,
    )
    assert link
    rows = list(csv.reader(io.StringIO(base64.b64decode(link.group(1)).decode("utf-8"))))
    assert [row[0] for row in rows[1:]] == ["a.png", "b.png"]


@pytest.mark.parametrize(("threshold", "counted"), [(0.0, 2), (1.01, 0)])
def test_uncertain_images_are_listed_apart_and_not_counted(tiny_model_path, make_image, threshold, counted):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": threshold})
    text = page_text(post_files(app.test_client(), [("a.png", make_image()), ("b.png", make_image(size=(60, 90)))]))
    assert f"Over the {counted} image" in text
    if counted:
        assert "Uncertain (" not in text
    else:
        assert "Uncertain (2)" in text and "No image was classified with confidence" in text


def test_outside_ranges_are_marked_in_words(tiny_model_path, make_image):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    # Two images cannot put every class within its range (the four lower bounds alone need 63%), so
    # something is marked, in words and not only in colour.
    text = page_text(post_files(app.test_client(), [("a.png", make_image()), ("b.png", make_image(size=(60, 90)))]))
    marked = re.findall(r'<tr class="is-outside">.*?<strong>(Below|Above) range</strong>', text, re.S)
    assert marked


def test_too_many_files_return_home_with_a_clear_message(tiny_model_path, make_image):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_BATCH_FILES": 2})
    response = post_files(app.test_client(), [(f"{i}.png", make_image()) for i in range(3)])
    assert response.status_code == 413
    text = page_text(response)
    assert "Predict Blood Cell Type" in text and "You can send up to 2 at once" in text
