"""Several images at once: the batch module (every white cell of every image), and the batch result page posted from
the home page's form."""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from app import create_app
from hematovision.batch import (
    NO_WHITE_CELL,
    CellResult,
    ItemResult,
    classify_files,
    count_differential,
    reading_order,
    write_csv,
)
from hematovision.cells import Cell
from hematovision.imaging import ImageRejected, prepare_field

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
FIELDS = Path(__file__).resolve().parent / "data" / "fields"
TWO_CELLS = (FIELDS / "bccd_00010_two_wbc.jpg").read_bytes()
ONE_CELL = (FIELDS / "bccd_00001_one_wbc.jpg").read_bytes()
CSV_HEADER = ["file", "cell", "xmin", "ymin", "xmax", "ymax", "label", "probability", "uncertain", "reason",
              *LABELS, "error"]


def post_files(client, files: list[tuple[str, bytes]]):
    fields = MultiDict([("file", FileStorage(io.BytesIO(data), name)) for name, data in files])
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    return client.post("/predict", data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


def blank_png(size=(320, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, format="PNG")
    return buffer.getvalue()


def cell(label: str, top: float = 0.9, uncertain: bool = False, number: int = 1, box=(0, 0, 10, 10)) -> CellResult:
    rest = (1 - top) / (len(LABELS) - 1)
    probabilities = {other: (top if other == label else rest) for other in LABELS}
    return CellResult(number=number, box=box, probabilities=probabilities, label=label, uncertain=uncertain,
                      reason="low_confidence" if uncertain else None)


def image(name: str, *cells: CellResult) -> ItemResult:
    return ItemResult(filename=name, cells=list(cells), primary=0 if cells else None, cells_found=len(cells))


# --- hematovision.batch ----------------------------------------------------------------------------


def test_classify_files_answers_each_white_cell_and_keeps_order(app):
    classifier = app.extensions["hematovision"]
    results = classify_files(classifier, [("a", TWO_CELLS), ("b", b"junk"), ("c", ONE_CELL), ("d", blank_png())],
                             thumbnail_side=50)
    assert [r.filename for r in results] == ["a", "b", "c", "d"]
    assert isinstance(results[1].error, ImageRejected) and results[1].error.status == 415
    for r, data in zip([results[0], results[2]], [TWO_CELLS, ONE_CELL], strict=True):
        prepared = prepare_field(data)
        expected = classifier.predict(prepared.crops)  # the model on each cell's canonical crop
        assert len(r.cells) == r.cells_found == len(prepared.cells) and r.size == (320, 240)
        assert [c.number for c in r.cells] == list(range(1, len(r.cells) + 1))
        for c in r.cells:
            assert c.box == prepared.cells[c.field_index].box
            assert np.allclose([c.probabilities[label] for label in LABELS], expected[c.field_index], atol=1e-5)
            assert c.label == LABELS[int(np.argmax(expected[c.field_index]))]
        assert r.primary_cell.field_index == prepared.primary
        assert (r.label, r.uncertain, r.reason) == (r.primary_cell.label, r.primary_cell.uncertain,
                                                   r.primary_cell.reason)
        assert max(r.thumbnail.size) <= 50  # only a thumbnail is kept, not the full decoded image
    blank = results[3]
    assert blank.ok and blank.no_cell and blank.cells == [] and blank.primary_cell is None
    assert (blank.label, blank.uncertain, blank.reason) == (None, True, NO_WHITE_CELL)


def test_classify_files_with_only_bad_files_does_not_call_the_model(app):
    results = classify_files(app.extensions["hematovision"], [("a", b""), ("b", b"junk")])
    assert [r.error.status for r in results] == [400, 415]


def test_at_most_max_cells_are_classified_the_central_ones(app):
    (r,) = classify_files(app.extensions["hematovision"], [("a", TWO_CELLS)], max_cells=1)
    prepared = prepare_field(TWO_CELLS)
    assert r.cells_found == 2 and len(r.cells) == 1 and r.capped
    assert r.cells[0].box == prepared.cells[prepared.primary].box and r.primary == 0


def test_cells_are_numbered_in_reading_order():
    def at(x, y, size=40):
        return Cell((x - size // 2, y - size // 2, x + size // 2, y + size // 2), 100, 1.0)

    # Two rows; in each, a cell a little higher on the right still comes after its left neighbour.
    cells = [at(200, 95), at(50, 100), at(120, 210), at(30, 200), at(300, 215)]
    assert reading_order(cells, list(range(5))) == [1, 0, 3, 2, 4]
    assert reading_order(cells, [2]) == [2]


def test_differential_counts_the_confident_cells_of_all_images():
    results = [image("a.png", cell("NEUTROPHIL"), cell("NEUTROPHIL", number=2), cell("LYMPHOCYTE", number=3),
                     cell("LYMPHOCYTE", number=4))]
    results += [image("b.png", cell("NEUTROPHIL"), cell("EOSINOPHIL", 0.4, uncertain=True, number=2))]
    results += [image(f"{i}.png", cell("NEUTROPHIL" if i < 2 else "LYMPHOCYTE")) for i in range(4)]
    results += [image("c.png", cell("MONOCYTE")), image("empty.png")]
    results += [ItemResult(filename="bad.txt", error=ImageRejected(415, "not an image"))]
    diff = count_differential(results, LABELS)
    assert diff.counted == 10 and diff.cells == 11
    rows = {row.label: row for row in diff.rows}
    assert (rows["NEUTROPHIL"].count, rows["NEUTROPHIL"].percent, rows["NEUTROPHIL"].flag) == (5, 50.0, "")
    assert (rows["LYMPHOCYTE"].percent, rows["LYMPHOCYTE"].flag) == (40.0, "")  # the range is inclusive
    assert (rows["MONOCYTE"].percent, rows["MONOCYTE"].flag) == (10.0, "high")
    assert (rows["EOSINOPHIL"].count, rows["EOSINOPHIL"].flag) == (0, "low")  # the uncertain one is not counted
    assert [(r.filename, c.number) for r, c in diff.uncertain] == [("b.png", 2)]
    assert [r.filename for r in diff.no_cell] == ["empty.png"]
    assert [r.filename for r in diff.rejected] == ["bad.txt"]


def test_csv_has_a_row_per_cell_with_its_box_and_defuses_formulas():
    results = [
        image("=HYPERLINK(1).png", cell("MONOCYTE", 0.7, box=(1, 2, 30, 40)),
              cell("NEUTROPHIL", 0.45, uncertain=True, number=2, box=(50, 60, 90, 99))),
        image("empty.png"),
        ItemResult("b.txt", error=ImageRejected(415, "no")),
    ]
    rows = list(csv.reader(io.StringIO(write_csv(results, LABELS))))
    assert rows[0] == CSV_HEADER
    assert rows[1][:10] == ["'=HYPERLINK(1).png", "1", "1", "2", "30", "40", "MONOCYTE", "0.7000", "no", ""]
    assert rows[2][:10] == ["'=HYPERLINK(1).png", "2", "50", "60", "90", "99", "NEUTROPHIL", "0.4500", "yes",
                            "low confidence"]
    assert rows[2][10:14] == ["0.1833", "0.1833", "0.1833", "0.4500"]
    assert rows[3] == ["empty.png", "", "", "", "", "", "", "", "yes", "no white cell found", "", "", "", "", ""]
    assert rows[4][0] == "b.txt" and rows[4][-1] == "no" and rows[4][1:-1] == [""] * 13
    assert len(rows) == 5


# --- the batch page --------------------------------------------------------------------------------


def page_text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def test_home_form_accepts_several_files(client):
    text = page_text(client.get("/"))
    tag = re.search(r'<input id="file"[^>]*>', text, re.S).group(0)
    assert " multiple" in tag and 'name="file"' in tag


def test_several_files_give_the_batch_page(tiny_model_path):
    # A threshold of 0 counts every cell, so the count table with its reference ranges is shown.
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    client = app.test_client()
    files = [("two.jpg", TWO_CELLS), ("one.jpg", ONE_CELL), ("junk.txt", b"nope"), ("white.png", blank_png())]
    response = post_files(client, files)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    text = page_text(response)
    assert "Batch Result" in text and "Differential count" in text
    lead = " ".join(re.search(r'<p class="lead">(.*?)</p>', text, re.S).group(1).split())
    assert lead == ("3 images read, 3 white cells found and classified, 1 image without a white cell, 1 file could "
                    "not be read.")
    assert len(re.findall(r'<img class="batch-table__thumb" src="data:image/jpeg;base64,', text)) == 3
    classifier = app.extensions["hematovision"]
    for name, data in (("two.jpg", TWO_CELLS), ("one.jpg", ONE_CELL)):
        row = re.search(rf'<td class="batch-table__file">{re.escape(name)}</td>\s*<td>(.*?)</td>', text, re.S).group(1)
        prepared = prepare_field(data)
        order = sorted(range(len(prepared.cells)), key=lambda i: prepared.cells[i].centre[0])  # side by side
        labels = [LABELS[int(np.argmax(p))] for p in classifier.predict(prepared.crops[order])]
        shown = re.findall(r'<span class="cell-number">(\d+)</span>\s*<span class="cell-list__label">(\w+)</span>', row)
        assert shown == [(str(i + 1), label.capitalize()) for i, label in enumerate(labels)]
    # Each thumbnail carries its numbered boxes.
    assert len(re.findall(r'<g class="cell-box[^"]*">', text)) == 3
    assert re.search(r'<td class="batch-table__file">white.png</td>\s*<td>\s*No white blood cell found', text)
    counts = [int(n) for n in re.findall(r'<th scope="row">[A-Z][a-z]+</th>\s*<td class="num">(\d+)</td>', text)]
    assert sum(counts) == 3  # the differential counts cells, not images
    # A file that could not be read is named with its reason.
    assert "Could not be read (1)" in text and "<li>junk.txt: This file is not an image we can read." in text
    assert "No white blood cell found (1)" in text
    for reference in ("40–60%", "20–40%", "2–8%", "1–4%"):
        assert reference in text


def test_batch_page_offers_one_csv_row_per_cell(client):
    text = page_text(post_files(client, [("a.jpg", TWO_CELLS), ("b.png", blank_png()), ("c.jpg", ONE_CELL)]))
    link = re.search(
        r'<a class="button" href="data:text/csv;charset=utf-8;base64,([^"]+)" '
        r'download="hematovision_results.csv">',
        text,
    )
    assert link
    rows = list(csv.reader(io.StringIO(base64.b64decode(link.group(1)).decode("utf-8"))))
    assert rows[0] == CSV_HEADER
    assert [(row[0], row[1]) for row in rows[1:]] == [("a.jpg", "1"), ("a.jpg", "2"), ("b.png", ""), ("c.jpg", "1")]
    boxes = {cell.box for cell in prepare_field(TWO_CELLS).cells}
    assert {tuple(int(v) for v in row[2:6]) for row in rows[1:3]} == boxes
    assert rows[3][9] == "no white cell found"


@pytest.mark.parametrize(("threshold", "counted"), [(0.0, 3), (1.01, 0)])
def test_uncertain_cells_are_listed_apart_and_not_counted(tiny_model_path, threshold, counted):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": threshold})
    text = page_text(post_files(app.test_client(), [("a.jpg", TWO_CELLS), ("b.jpg", ONE_CELL)]))
    assert f"Over the {counted} white cell" in text
    if counted:
        assert "Uncertain cells (" not in text
    else:
        assert "Uncertain cells (3)" in text and "No white cell was given a type" in text
        assert "a.jpg, cell 2: low confidence" in text


def test_a_few_cells_are_not_compared_with_the_reference_ranges(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    # Three cells cannot put every class within its range, but three cells say nothing about ranges.
    text = " ".join(page_text(post_files(app.test_client(), [("a.jpg", TWO_CELLS), ("b.jpg", ONE_CELL)])).split())
    assert "Too few cells to compare with the reference ranges:</strong> 3 counted, at least 50 needed." in text
    assert "is-outside" not in text and "Below range" not in text and "Above range" not in text
    assert "Adult range" in text and "40–60%" in text  # the ranges are still there to read


def test_fifty_cells_are_compared_and_outside_ranges_are_marked_in_words(tiny_model_path):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0,
                      "MAX_BATCH_FILES": 25})
    text = page_text(post_files(app.test_client(), [(f"{i}.jpg", TWO_CELLS) for i in range(25)]))
    assert "Over the 50 white cells given a type" in " ".join(text.split()) and "Too few cells" not in text
    # One field's two cells, fifty times over, cannot put every class within its range: something is marked, in
    # words and not only in colour.
    marked = re.findall(r'<tr class="is-outside">.*?<strong>(Below|Above) range</strong>', text, re.S)
    assert marked


def test_too_many_files_return_home_with_a_clear_message(tiny_model_path, make_image):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "MAX_BATCH_FILES": 2})
    response = post_files(app.test_client(), [(f"{i}.png", make_image()) for i in range(3)])
    assert response.status_code == 413
    text = page_text(response)
    assert "Predict Blood Cell Type" in text and "You can send up to 2 at once" in text
