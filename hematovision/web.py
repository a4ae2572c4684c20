"""The upload form and its results (one image, or several: the batch page), and the helpers the views lean on.

Views stay thin: image checks live in hematovision.imaging, the model in hematovision.classifier, classifying and
counting a batch in hematovision.batch. Error answers are hematovision.errors'; the other pages hematovision.pages'.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from flask import Blueprint, Request, current_app, make_response, redirect, render_template, request, url_for
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.wrappers import Response

from hematovision import gradcam
from hematovision.abstention import REASON_SHORT, REASONS
from hematovision.batch import classify_files, count_differential, write_csv
from hematovision.classifier import Classifier
from hematovision.imaging import ImageRejected, decode_image, to_model_input

EXTENSION_KEY = "hematovision"
GRADCAM_KEY = "hematovision.gradcam"
THUMBNAIL_MAX_SIDE = 448
BATCH_THUMBNAIL_SIDE = 96
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
        return render_home(exc.message, exc.status)
    return render_prediction(image, upload.filename, explain=request.form.get("explain") == "on")


# --- helpers -----------------------------------------------------------------------------------------


def render_prediction(image: Image.Image, filename: str, explain: bool = False):
    """The result page for one decoded image (an upload or a sample). The Grad-CAM overlay costs several times
    the prediction itself (bench/results/bench_predict.json), so it is computed only when the person asks for it."""
    classifier = get_classifier()
    model_input = to_model_input(image)
    assessment = classifier.assess(model_input[None], min_probability=uncertain_below())
    scores = rank_classes(classifier.labels, assessment.probabilities[0])
    reason = assessment.reasons[0]
    image_uri, (width, height) = encode_thumbnail(image)
    best = scores[0]
    heatmap_uri = None
    if explain:
        heatmap_uri = explain_prediction(image, model_input, classifier.labels.index(best.label), (width, height))
    current_app.logger.info("Predicted %s (%s, %s) for a %dx%d image", best.label, best.percent,
                            reason or "answered", *image.size)
    response = make_response(
        render_template(
            "predict.html",
            predicted=best,
            uncertain=reason is not None,
            reason_short=REASON_SHORT.get(reason, ""),
            reason_text=REASONS.get(reason, ""),
            scores=scores,
            image_uri=image_uri,
            image_width=width,
            image_height=height,
            filename=shorten(filename),
            heatmap_uri=heatmap_uri,
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


def explain_prediction(image: Image.Image, model_input: np.ndarray, class_index: int, size) -> str | None:
    """A Grad-CAM overlay at the thumbnail's `size` as a JPEG data: URI, or None if this model cannot be explained.
    Only the single-image page pays for it, when its box is ticked (bench/results/bench_predict.json); the batch
    page and the API do not. The first call after start-up also loads Keras and the .h5, which serving with TFLite
    skipped, and traces the graph: it takes seconds, once."""
    try:
        explainer = current_app.extensions.get(GRADCAM_KEY)
        if explainer is None:
            explainer = current_app.extensions[GRADCAM_KEY] = gradcam.GradCam(get_classifier().model)
        heatmap = explainer.compute_heatmap(model_input, class_index, shifts=int(current_app.config["GRADCAM_SHIFTS"]),
                                            method=current_app.config["GRADCAM_METHOD"])
    except Exception:  # the heatmap is an extra: whatever breaks it (another backend, no spatial layer),
        current_app.logger.exception("No Grad-CAM heatmap")  # the prediction is still shown
        return None
    thumbnail = image if image.size == size else image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return gradcam.encode_jpeg_uri(gradcam.overlay_heatmap(thumbnail, heatmap))


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
        thumbnail_side=BATCH_THUMBNAIL_SIDE,
    )
    rows = [(r, *encode_thumbnail(r.thumbnail, BATCH_THUMBNAIL_SIDE)) for r in results if r.ok]
    csv_text = write_csv(results, classifier.labels)
    current_app.logger.info("Batch: %d files, %d classified", len(results), sum(r.ok for r in results))
    response = make_response(
        render_template(
            "batch.html",
            rows=rows,
            differential=count_differential(results, classifier.labels),
            threshold=classifier.min_probability(uncertain_below()),
            distance_rule=classifier.rule.tests_distance,
            csv_uri="data:text/csv;charset=utf-8;base64," + base64.b64encode(csv_text.encode("utf-8")).decode(),
            shorten=shorten,
        )
    )
    response.headers["Cache-Control"] = "no-store"  # the page embeds the person's images
    return response


def rank_classes(labels: list[str], probabilities: np.ndarray) -> list[ClassScore]:
    """Classes from most to least likely. The sort is stable, so a tie keeps np.argmax's choice first."""
    scores = [ClassScore(label, float(p)) for label, p in zip(labels, probabilities, strict=True)]
    return sorted(scores, key=lambda score: score.probability, reverse=True)


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
