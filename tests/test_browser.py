"""End to end in a real headless Chromium: the app (tiny real model) served on a local port, a person's clicks.

Needs the `playwright` Python package and a Chromium binary (`apt-get install chromium`; no `playwright install`:
the system browser is used). Skips, with the reason, when either is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from werkzeug.serving import make_server

from app import create_app
from hematovision.imaging import prepare_field

LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
FIELDS = Path(__file__).resolve().parent / "data" / "fields"
SAMPLES = Path(__file__).resolve().parent / "data" / "samples"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("HEMATOVISION_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed", exc_type=ImportError
    )
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set HEMATOVISION_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def serving(app):
    """The app on 127.0.0.1 at a free port, in a thread: yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def live_app(tiny_model_path):
    """The app served in a thread; the threshold 0 counts every image in a batch."""
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "UNCERTAIN_BELOW": 0.0})
    with serving(app) as base:
        yield app, base


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []  # console errors include CSP violations: the pages must need no inline code
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert problems == []


def expected_label(app, data: bytes) -> str:
    """The class of the primary white cell of these bytes, through the app's own pipeline."""
    crop = prepare_field(data).primary_crop
    return LABELS[int(np.argmax(app.extensions["hematovision"].predict(crop[None])[0]))]


def test_upload_one_image_and_read_the_result(live_app, page, make_image):
    app, base = live_app
    data = make_image("PNG")
    page.goto(base + "/")
    page.set_input_files("#file", files=[{"name": "cell.png", "mimeType": "image/png", "buffer": data}])
    page.get_by_label("Also show where the model looked").check()
    page.get_by_role("button", name="Predict", exact=True).click()
    page.wait_for_url(base + "/predict")
    assert page.locator("h1").inner_text() == "Prediction Result"
    predicted = re.search(r"Predicted Class: (\w+)", page.locator(".predicted").inner_text()).group(1)
    assert predicted.upper() == expected_label(app, data)

    # The heatmap was asked for: the page opens on it, with its colour scale; the no-script toggle shows the image.
    heatmap, legend = page.locator(".result__image--heatmap"), page.locator(".heat-legend")
    assert heatmap.is_visible() and not page.locator(".result__image").first.is_visible()
    assert legend.is_visible() and legend.locator(".heat-legend__bar").bounding_box()["width"] > 100
    assert legend.locator(".heat-legend__scale").inner_text().split() == ["less", "more"]
    page.get_by_text("Image", exact=True).click()
    assert not heatmap.is_visible() and page.locator(".result__image").first.is_visible() and not legend.is_visible()
    page.get_by_text("Where the model looked").click()
    assert heatmap.is_visible()


def test_upload_a_batch_and_read_the_table(live_app, page, make_image, tmp_path):
    app, base = live_app
    images = {
        "a.png": make_image("PNG"),
        "b.jpg": make_image("JPEG", size=(90, 200)),
        "c.png": make_image(size=(64, 64)),
    }
    files = [{"name": name, "mimeType": "image/png", "buffer": data} for name, data in images.items()]
    files.append({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
    page.goto(base + "/")
    page.set_input_files("#file", files=files)
    page.get_by_role("button", name="Predict", exact=True).click()
    page.wait_for_url(base + "/predict")
    assert page.locator("h1").inner_text() == "Batch Result"

    rows = page.locator(".batch-table tbody tr")
    assert rows.count() == 3
    for i, (name, data) in enumerate(images.items()):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[1] == name
        assert rows.nth(i).locator(".cell-list__label").all_inner_texts() == [expected_label(app, data).capitalize()]
        assert rows.nth(i).locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
        assert rows.nth(i).locator(".cell-box").count() == 1  # its white cell, boxed on the thumbnail
    counts = page.locator(".differential tbody tr td:nth-child(2)").all_inner_texts()
    assert sum(int(c) for c in counts) == 3
    assert "notes.txt" in page.locator(".batch__apart").inner_text()

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download results as CSV").click()
    download = download_info.value
    assert download.suggested_filename == "hematovision_results.csv"
    lines = Path(download.path()).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("file,cell,xmin,ymin,xmax,ymax,label,probability,uncertain") and len(lines) == 5


def test_model_card_and_a_sample_from_the_header_and_home_page(live_app, page):
    _app, base = live_app
    page.goto(base + "/")
    page.get_by_role("navigation").get_by_role("link", name="About the model").click()
    assert page.locator("h1").inner_text() == "About the model"
    page.goto(base + "/")
    page.get_by_role("button", name="Monocyte").click()
    assert page.locator("h1").inner_text() == "Prediction Result"
    assert "Sample: monocyte.jpeg" in page.locator("figcaption").inner_text()


@pytest.mark.parametrize("width", [1280, 390])
def test_a_field_shows_each_white_cell_boxed_and_numbered(live_app, browser, width):
    """The two-white-cell field: the boxes lie over the picture where the cells are, carry the numbers of the
    table's rows, and the page fits the screen."""
    app, base = live_app
    data = (FIELDS / "bccd_00010_two_wbc.jpg").read_bytes()
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.goto(base + "/")
    page.set_input_files("#file", files=[{"name": "field.jpg", "mimeType": "image/jpeg", "buffer": data}])
    page.get_by_role("button", name="Predict", exact=True).click()
    page.wait_for_url(base + "/predict")
    assert page.locator(".predicted").inner_text() == "2 white blood cells found"

    image = page.locator(".result__image").bounding_box()
    scale = image["width"] / 320
    prepared = prepare_field(data)
    left_first = sorted(prepared.cells, key=lambda cell: cell.centre[0])  # side by side: numbered left to right
    for number, cell in enumerate(left_first, start=1):
        box = page.locator(f'.cell-box[data-cell="{number}"]')
        assert box.locator("text").text_content() == str(number)
        assert box.locator(".cell-box__badge").bounding_box()["width"] > 0
        frame = box.locator(".cell-box__frame").bounding_box()
        x0, y0, x1, y1 = cell.box
        assert frame["x"] == pytest.approx(image["x"] + x0 * scale, abs=3)
        assert frame["y"] == pytest.approx(image["y"] + y0 * scale, abs=3)
        assert frame["width"] == pytest.approx((x1 - x0) * scale, abs=4)
        assert frame["height"] == pytest.approx((y1 - y0) * scale, abs=4)
    rows = page.locator(".cells-table tbody tr")
    assert rows.count() == 2
    crops = prepared.crops[[prepared.cells.index(cell) for cell in left_first]]
    labels = [LABELS[int(np.argmax(p))] for p in app.extensions["hematovision"].predict(crops)]
    for i, label in enumerate(labels):
        assert rows.nth(i).locator(".cell-number").inner_text() == str(i + 1)
        assert label.capitalize() in rows.nth(i).inner_text()
    assert page.locator(".differential").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing hides off to the side
    context.close()
    assert problems == []


# --- every page at a phone's and a desktop's width --------------------------------------------------------------


@pytest.fixture
def realistic_app(tiny_model_path, tmp_path):
    """The tiny model with the metadata, figures and leave-one-lab-out table of a model trained on three labs."""
    from tests.test_pages import LEAVE_ONE_LAB_OUT, realistic_metadata, write_model

    model = write_model(tiny_model_path, tmp_path / "model", realistic_metadata(), LEAVE_ONE_LAB_OUT)
    app = create_app({"TESTING": True, "MODEL_PATH": str(model)})
    with serving(app) as base:
        yield app, base


def submit(page, base: str, files, explain: bool = False) -> None:
    page.goto(base + "/")
    page.set_input_files("#file", files=files)
    if explain:
        page.get_by_label("Also show where the model looked").check()
    page.get_by_role("button", name="Predict", exact=True).click()
    page.wait_for_url(base + "/predict")


@pytest.mark.parametrize("width", [390, 1280])
def test_every_page_fits_the_screen_with_no_console_error(realistic_app, browser, width):
    """The home page, a one-image result (with its heatmap), an 8-image batch result and the model card: none wider
    than a 390 px phone, none with a console error (a CSP violation included), every picture loaded."""
    _app, base = realistic_app
    batch = sorted(SAMPLES.glob("*/*.jpeg"))[:8]
    assert len(batch) == 8
    context = browser.new_context(viewport={"width": width, "height": 844})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    field = next(FIELDS.glob("*00001*.jpg"))
    visits = {
        "home": lambda: page.goto(base + "/"),
        "one image": lambda: submit(page, base, [str(field)], explain=True),
        "batch of 8": lambda: submit(page, base, [str(path) for path in batch]),
        "model card": lambda: page.goto(base + "/model"),
    }
    widths = {}
    for name, visit in visits.items():
        visit()
        page.wait_for_load_state("load")
        widths[name] = page.evaluate("document.documentElement.scrollWidth")
        broken = page.evaluate("[...document.images].filter(img => !(img.complete && img.naturalWidth > 0)).length")
        assert broken == 0, f"{name}: {broken} image(s) not shown"
        if name == "batch of 8":
            assert page.locator(".batch-table tbody tr").count() == 8
            thumb = page.locator(".batch-table__thumb").first.bounding_box()["width"]
            assert thumb >= (300 if width == 390 else 190)  # large enough to see the cell: the card's width on a phone
    context.close()
    assert widths == {name: min(widths[name], width) for name in widths}, f"wider than {width} px: {widths}"
    assert problems == []


def test_predict_says_it_is_working_and_is_sent_once(live_app, page, make_image):
    app, base = live_app
    app.before_request(slow_posts)  # time to see the busy state, and to press again
    posts: list[str] = []
    page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
    page.goto(base + "/")
    page.set_input_files("#file", files=[{"name": "cell.png", "mimeType": "image/png", "buffer": make_image()}])
    # Just after the press, note what the form shows, then press again (Enter, or a double click, would).
    page.evaluate("""() => document.addEventListener("submit", () => setTimeout(() => {
        const button = document.querySelector("form button[type=submit]");
        const status = document.querySelector(".busy-status");
        sessionStorage.setItem("seen", JSON.stringify(
            {text: button.textContent, disabled: button.disabled, status: status.textContent, shown: !status.hidden}));
        document.querySelector("form").requestSubmit();
    }, 50), {once: true})""")
    page.get_by_role("button", name="Predict", exact=True).click()
    page.wait_for_url(base + "/predict")
    assert page.locator("h1").inner_text() == "Prediction Result"
    seen = page.evaluate("JSON.parse(sessionStorage.getItem('seen'))")
    assert seen == {"text": "Classifying...", "disabled": True, "status": "Classifying... this takes a few seconds.",
                    "shown": True}
    assert posts == [base + "/predict"]  # sent once
    page.go_back()  # back on the form: ready for the next image
    page.wait_for_url(base + "/")
    assert page.get_by_role("button", name="Predict", exact=True).is_enabled()


def slow_posts() -> None:
    from flask import request

    if request.method == "POST":
        time.sleep(1.0)


def test_the_form_works_without_javascript(live_app, browser, make_image):
    _app, base = live_app
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    submit(page, base, [{"name": "cell.png", "mimeType": "image/png", "buffer": make_image()}])
    assert page.locator("h1").inner_text() == "Prediction Result"
    context.close()
