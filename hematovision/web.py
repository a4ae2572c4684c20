"""The upload form and its results (one image, or several: the batch page), and the helpers the views lean on.

Views stay thin: image checks and the white cells' crops live in hematovision.imaging, the model in
hematovision.classifier, classifying each cell and counting in hematovision.batch. Error answers are
hematovision.errors'; the other pages hematovision.pages'.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass

import numpy as np
from flask import Blueprint, Request, current_app, make_response, redirect, render_template, request, url_for
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.wrappers import Response

from hematovision import gradcam
from hematovision.batch import (
    MAX_CELLS_PER_IMAGE,
    NO_WHITE_CELL_TEXT,
    ItemResult,
    classify_field,
    classify_files,
    count_differential,
    nearest_centre,
    write_csv,
)
from hematovision.classifier import Classifier
from hematovision.imaging import IMAGE_SIZE, Field, ImageRejected, decode_image, field_from_image

EXTENSION_KEY = "hematovision"
GRADCAM_KEY = "hematovision.gradcam"
THUMBNAIL_MAX_SIDE = 448
BATCH_THUMBNAIL_SIDE = 320  # pixels of a batch thumbnail: sharp at a phone's full card width
BATCH_THUMBNAIL_WIDTH = 200  # ... and the CSS pixels it is shown at in the wide table
BADGE_SIZE = 22  # the number's badge on a box, in CSS pixels at the result page's image width
SMALL_BADGE_SIZE = 16  # ... on the batch page's thumbnails, at BATCH_THUMBNAIL_WIDTH
HEATMAP_MAX_CELLS = 8  # cells explained on one result page at most: each costs one heatmap
# The calibrated probability of a cell's type, in words: the one place these bands are set (the pages, and the
# model card that explains them, read them from here). The probabilities are calibrated on validation cells, so the
# bands mean what they say: of the cells called "likely" (80-95%), 80 to 95 in 100 are of that type.
PROBABILITY_WORDS = ((0.95, "almost certain"), (0.80, "likely"), (0.60, "possible"), (0.0, "unsure"))
# A differential is compared with the adult reference ranges only over at least this many counted cells; below it,
# a share is too rough for "below range" or "above range" to mean anything.
MIN_CELLS_TO_COMPARE = 50
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
}

bp = Blueprint("web", __name__)


class InMemoryRequest(Request):
    """A request whose uploaded files stay in memory. Werkzeug spools uploads over 500 KB to a temporary
    file on disk; we promise never to store images, and MAX_CONTENT_LENGTH already bounds the memory."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


@dataclass(frozen=True)
class BoxView:
    """One cell's box and number badge, in the units of the SVG drawn over the image (box_views)."""

    number: int
    x: float
    y: float
    width: float
    height: float
    badge_x: float
    badge_y: float
    badge: int  # the badge's side
    uncertain: bool


@dataclass(frozen=True)
class ImageRow:
    """One image of the batch page: its result, thumbnail and boxes."""

    result: ItemResult
    uri: str
    size: tuple[int, int]
    view_width: int
    view_height: int
    boxes: list[BoxView]


@dataclass(frozen=True)
class ClassScore:
    label: str
    probability: float

    @property
    def percent(self) -> str:
        return f"{self.probability * 100:.1f}%"


# --- views -------------------------------------------------------------------------------------------


@bp.get("/")
def index():
    return render_home()


@bp.get("/predict")
def predict_form():
    # A bookmarked or refreshed result page has nothing to show without an upload.
    return redirect(url_for("web.index"))


@bp.post("/predict")
def predict():
    uploads = [upload for upload in request.files.getlist("file") if upload.filename]
    if len(uploads) > 1:
        return render_batch(uploads)
    upload = request.files.get("file")
    if upload is None:
        return render_home("No file was sent. Please choose an image to upload.", 400)
    if not upload.filename:
        return render_home("No file was selected. Please choose an image to upload.", 400)
    try:
        image = decode_image(upload.read(), max_pixels=current_app.config["MAX_IMAGE_PIXELS"])
    except ImageRejected as exc:
        current_app.logger.info("Upload rejected (%s): %s", exc.status, exc.message)
        return render_home(about_file(upload.filename, exc.message), exc.status)
    return render_prediction(image, upload.filename, explain=request.form.get("explain") == "on")


# --- helpers -----------------------------------------------------------------------------------------


def render_prediction(image: Image.Image, filename: str, explain: bool = False):
    """The result page for one decoded image (an upload or a sample): the image with each white cell found boxed
    and numbered, and the answer for each. The Grad-CAM overlay costs several times the prediction itself
    (bench/results/bench_predict.json), so it is computed only when the person asks for it."""
    classifier = get_classifier()
    prepared = field_from_image(image)
    result = classify_field(classifier, prepared, filename, uncertain_below=uncertain_below(),
                            max_cells=max_cells_per_image())
    image_uri, (width, height) = encode_thumbnail(image)
    view_width, view_height, boxes = box_views(result, THUMBNAIL_MAX_SIDE)
    primary = result.primary_cell
    heatmap_uri, explained = None, []
    if explain and result.cells:
        heatmap_uri, explained = explain_cells(image, prepared, result, (width, height))
    current_app.logger.info("%d white cell(s) found in a %dx%d image; primary %s (%s)", result.cells_found,
                            *image.size, primary.label if primary else "none",
                            (primary.reason or "answered") if primary else "-")
    response = make_response(
        render_template(
            "predict.html",
            result=result,
            cells=result.cells,
            scores=rank_classes(classifier.labels, primary.probabilities) if primary else [],
            cell_scores={cell.number: rank_classes(classifier.labels, cell.probabilities) for cell in result.cells},
            differential=count_differential([result], classifier.labels) if len(result.cells) > 1 else None,
            no_cell_text=NO_WHITE_CELL_TEXT,
            boxes=boxes,
            view_width=view_width,
            view_height=view_height,
            image_uri=image_uri,
            image_width=width,
            image_height=height,
            filename=shorten(filename),
            heatmap_uri=heatmap_uri,
            explained=explained,
            heatmap_asked=explain,
        )
    )
    response.headers["Cache-Control"] = "no-store"  # the page embeds the person's image
    return response


def get_classifier() -> Classifier:
    return current_app.extensions[EXTENSION_KEY]


def uncertain_below() -> float | None:
    """The UNCERTAIN_BELOW setting: None (the model's fitted low-confidence threshold) or a number replacing it."""
    value = current_app.config.get("UNCERTAIN_BELOW")
    return None if value is None or value == "" else float(value)


def max_cells_per_image() -> int:
    """The MAX_CELLS_PER_IMAGE setting (FLASK_MAX_CELLS_PER_IMAGE): white cells classified per image at most."""
    return int(current_app.config.get("MAX_CELLS_PER_IMAGE", MAX_CELLS_PER_IMAGE))


def explain_cells(image: Image.Image, prepared: Field, result: ItemResult,
                  size: tuple[int, int]) -> tuple[str | None, list[int]]:
    """A Grad-CAM overlay of the field at the thumbnail's `size`, as a JPEG data: URI, and the numbers of the cells
    it explains; (None, []) if this model cannot be explained. Each cell's heatmap is computed on its own crop (what
    the model saw), for the class given to that cell, and drawn back at the crop's place on the field; at most
    HEATMAP_MAX_CELLS cells, those nearest the image centre (the primary cell among them). Only the single-image page
    pays for it, when its box is ticked (bench/results/bench_predict.json); the batch page and the API do not. The
    first call after start-up also loads Keras and the .h5, which serving with TFLite skipped, and traces the
    graph: it takes seconds, once."""
    chosen = [result.cells[i] for i in nearest_centre(result.cells, result.size, HEATMAP_MAX_CELLS)]
    labels = get_classifier().labels
    try:
        explainer = get_explainer(current_app)
        heatmaps = [
            explainer.compute_heatmap(prepared.crops[cell.field_index], labels.index(cell.label),
                                      shifts=int(current_app.config["GRADCAM_SHIFTS"]),
                                      method=current_app.config["GRADCAM_METHOD"])
            for cell in chosen
        ]
    except Exception:  # the heatmap is an extra: whatever breaks it (another backend, no spatial layer),
        current_app.logger.exception("No Grad-CAM heatmap")  # the prediction is still shown
        return None, []
    thumbnail = image if image.size == size else image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    drawn = [(cell.box, heatmap) for cell, heatmap in zip(chosen, heatmaps, strict=True)]
    overlay = gradcam.overlay_cell_heatmaps(thumbnail, size[0] / image.size[0], drawn)
    return gradcam.encode_jpeg_uri(overlay), sorted(cell.number for cell in chosen)


_EXPLAINER_LOCK = threading.Lock()


def get_explainer(app) -> gradcam.GradCam:
    """The app's Grad-CAM explainer, built on first use (it loads Keras and the .h5: seconds). One lock, so that a
    request and the background preparation (prepare_heatmap) never build two."""
    explainer = app.extensions.get(GRADCAM_KEY)
    if explainer is None:
        with _EXPLAINER_LOCK:
            explainer = app.extensions.get(GRADCAM_KEY)
            if explainer is None:
                explainer = app.extensions[GRADCAM_KEY] = gradcam.GradCam(app.extensions[EXTENSION_KEY].model)
    return explainer


def prepare_heatmap(app) -> None:
    """Load Keras and the model, and trace the heatmap's graph on a blank crop, so that the first person who ticks
    the heatmap box does not wait for it. Run in a background thread after start-up (app.py); a failure only means
    the first heatmap is slow, or absent, as before."""
    try:
        explainer = get_explainer(app)
        explainer.compute_heatmap(np.zeros((*IMAGE_SIZE, 3), np.uint8), 0,
                                  shifts=int(app.config["GRADCAM_SHIFTS"]), method=app.config["GRADCAM_METHOD"])
        app.logger.info("Heatmap prepared")
    except Exception as exc:  # the pages work without it: the first heatmap is only slower, or absent
        app.logger.warning("The heatmap could not be prepared in the background: %s", exc)


def start_heatmap_preparation(app, wait_for_first_page: float = 10.0) -> threading.Thread:
    """prepare_heatmap(app) in a daemon thread (it never keeps the process alive). It first waits until the app has
    answered its first request, or `wait_for_first_page` seconds: loading Keras holds the interpreter for seconds,
    and the first page must not wait for it."""
    answered = threading.Event()

    def note_answered(response: Response) -> Response:
        answered.set()
        return response

    app.after_request(note_answered)

    def run() -> None:
        answered.wait(wait_for_first_page)
        prepare_heatmap(app)

    thread = threading.Thread(target=run, name="prepare-heatmap", daemon=True)
    thread.start()
    return thread


def render_home(error: str | None = None, status: int = 200):
    """The home page, optionally with an error message for the upload that just failed."""
    max_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
    labels = get_classifier().labels
    return render_template("index.html", error=error, labels=labels, max_upload_mb=f"{max_mb:g}"), status


def render_batch(uploads: list[FileStorage]):
    """The result page for several files posted to /predict at once: one row each, and the differential count."""
    max_files = int(current_app.config["MAX_BATCH_FILES"])
    if len(uploads) > max_files:
        return render_home(f"Too many files: {len(uploads)}. You can send up to {max_files} at once.", 413)
    classifier = get_classifier()
    results = classify_files(
        classifier,
        [(upload.filename or "(no name)", upload.read()) for upload in uploads],
        max_pixels=current_app.config["MAX_IMAGE_PIXELS"],
        uncertain_below=uncertain_below(),
        max_cells=max_cells_per_image(),
        thumbnail_side=BATCH_THUMBNAIL_SIDE,
    )
    rows = []
    for r in results:
        if r.ok:
            uri, size = encode_thumbnail(r.thumbnail, BATCH_THUMBNAIL_SIDE)
            # The boxes' units: the thumbnail as shown in the wide table (its badges keep a readable size there,
            # and grow with the picture on a phone's card).
            shown_width = max(1, round(size[0] * BATCH_THUMBNAIL_WIDTH / BATCH_THUMBNAIL_SIDE))
            rows.append(ImageRow(r, uri, size, *box_views(r, shown_width, SMALL_BADGE_SIZE)))
    csv_text = write_csv(results, classifier.labels)
    current_app.logger.info("Batch: %d files, %d read, %d white cells", len(results), sum(r.ok for r in results),
                            sum(len(r.cells) for r in results))
    response = make_response(
        render_template(
            "batch.html",
            rows=rows,
            differential=count_differential(results, classifier.labels),
            threshold=classifier.min_probability(uncertain_below()),
            distance_rule=classifier.rule.tests_distance,
            min_cells_to_compare=MIN_CELLS_TO_COMPARE,
            csv_uri="data:text/csv;charset=utf-8;base64," + base64.b64encode(csv_text.encode("utf-8")).decode(),
            shorten=shorten,
        )
    )
    response.headers["Cache-Control"] = "no-store"  # the page embeds the person's images
    return response


def rank_classes(labels: list[str], probabilities) -> list[ClassScore]:
    """Classes from most to least likely (`probabilities`: an array in label order, or a dict by label). The sort
    is stable, so a tie keeps np.argmax's choice first."""
    if isinstance(probabilities, dict):
        probabilities = [probabilities[label] for label in labels]
    scores = [ClassScore(label, float(p)) for label, p in zip(labels, probabilities, strict=True)]
    return sorted(scores, key=lambda score: score.probability, reverse=True)


def box_views(result: ItemResult, display_width: int, badge: int = BADGE_SIZE) -> tuple[int, int, list[BoxView]]:
    """The cells' boxes for the SVG drawn over an image shown `display_width` CSS pixels wide (at most): the
    SVG's view box (width, height) at that width, and a BoxView per cell in its units, so that the boxes, numbers
    and strokes keep one size on screen whatever the photo's own pixel size. `badge`: the side of the numbers'
    squares at that width."""
    if not result.size:
        return display_width, display_width, []
    width, height = result.size
    scale = display_width / width
    view_height = max(1, round(height * scale))
    boxes = []
    for cell in result.cells:
        x0, y0, x1, y1 = (value * scale for value in cell.box)
        # The number sits in the box's top-left corner, inside the image even for a box at its right or lower edge.
        bx = min(max(0.0, x0), display_width - badge)
        by = min(max(0.0, y0), view_height - badge)
        boxes.append(BoxView(cell.number, round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1),
                             round(bx, 1), round(by, 1), badge, cell.uncertain))
    return display_width, view_height, boxes


@bp.app_template_filter("in_words")
def in_words(probability: float) -> str:
    """A calibrated probability in words (PROBABILITY_WORDS)."""
    for floor, words in PROBABILITY_WORDS:
        if probability >= floor:
            return words
    return PROBABILITY_WORDS[-1][1]


@bp.app_context_processor
def offer_probability_bands():
    return {"probability_bands": probability_bands()}


def probability_bands() -> list[tuple[float, float, str]]:
    """PROBABILITY_WORDS as (from, up to, words), highest first, for the model card's explanation."""
    tops = [1.0] + [floor for floor, _ in PROBABILITY_WORDS[:-1]]
    return [(floor, top, words) for (floor, words), top in zip(PROBABILITY_WORDS, tops, strict=True)]


@bp.app_template_filter("rounded_percent")
def rounded_percent(probability: float) -> str:
    """A probability as a whole percent, never rounded up to a certainty it is not: '>99%' and '<1%' at the ends."""
    percent = probability * 100
    if percent >= 99.5 and probability < 1:
        return ">99%"
    if 0 < percent < 0.5:
        return "<1%"
    return f"{percent:.0f}%"


@bp.app_template_filter("cell_type")
def cell_type(label: str | None) -> str:
    """A class label as a person writes it: NEUTROPHIL -> Neutrophil (the CSV and the API keep the label)."""
    return (label or "").replace("_", " ").capitalize()


@bp.app_template_global()
def about_file(filename: str | None, message: str) -> str:
    """An error message that names its file: 'photo.png: The image is damaged...'."""
    return f"{shorten(filename)}: {message}" if filename else message


def encode_thumbnail(image: Image.Image, max_side: int = THUMBNAIL_MAX_SIDE) -> tuple[str, tuple[int, int]]:
    """A JPEG data: URI re-encoded from the decoded pixels: the page never echoes the uploaded bytes,
    which could be an HTML/SVG polyglot, and a 40 MP photo does not bloat the page."""
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    thumbnail = image
    if size != image.size:
        thumbnail = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    thumbnail.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), size


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- headers (registered by create_app) ---------------------------------------------------------------


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
