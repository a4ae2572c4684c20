"""Pages beyond one upload: the batch result with its differential count, the model card, and the samples.

Views stay thin: classification and counting live in hematovision.batch, the single result in hematovision.web.
"""

from __future__ import annotations

import base64
from pathlib import Path

from flask import Blueprint, abort, current_app, make_response, render_template, request, send_from_directory
from werkzeug.datastructures import FileStorage

from hematovision import web
from hematovision.batch import classify_files, count_differential, write_csv
from hematovision.imaging import decode_image

BATCH_THUMBNAIL_SIDE = 96
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "static" / "samples"
# One image per class, shipped in static/samples; the form can only name one of these.
SAMPLES = {
    "eosinophil": "eosinophil.jpeg",
    "lymphocyte": "lymphocyte.jpeg",
    "monocyte": "monocyte.jpeg",
    "neutrophil": "neutrophil.jpeg",
}

bp = Blueprint("pages", __name__)


# --- views -------------------------------------------------------------------------------------------


@bp.get("/model")
def model_card():
    classifier = web.get_classifier()
    return render_template(
        "model.html",
        meta=classifier.metadata,
        labels=classifier.labels,
        figures=[(name, describe_figure(name)) for name in list_model_figures(classifier.path)],
        model_file=classifier.path.name,
        uncertain_below=classifier.min_probability(web.uncertain_below()),
        temperature=classifier.temperature,
        temperature_slope=classifier.calibration.slope,
        distance_rule=classifier.rule.tests_distance,
    )


@bp.get("/model/files/<name>")
def model_file(name: str):
    classifier = web.get_classifier()
    if name not in list_model_figures(classifier.path):  # an allow-list, never a path from the request
        abort(404)
    return send_from_directory(classifier.path.parent, name, mimetype="image/png", max_age=3600)


@bp.post("/predict/sample")
def predict_sample():
    filename = SAMPLES.get(request.form.get("name", ""))
    if filename is None:
        return web.render_home("Unknown sample. Please choose one of the sample images.", 400)
    image = decode_image((SAMPLES_DIR / filename).read_bytes(), max_pixels=current_app.config["MAX_IMAGE_PIXELS"])
    return web.render_prediction(image, f"Sample: {filename}", explain=True)


@bp.app_context_processor
def offer_samples():
    """The home page's sample buttons; only the samples whose file is really there."""
    return {"samples": [(name, filename) for name, filename in SAMPLES.items() if (SAMPLES_DIR / filename).is_file()]}


# --- helpers used by hematovision.web ------------------------------------------------------------------


def render_batch(uploads: list[FileStorage]):
    """The result page for several files posted to /predict at once."""
    max_files = int(current_app.config["MAX_BATCH_FILES"])
    if len(uploads) > max_files:
        return web.render_home(f"Too many files: {len(uploads)}. You can send up to {max_files} at once.", 413)
    classifier = web.get_classifier()
    threshold = classifier.min_probability(web.uncertain_below())
    results = classify_files(
        classifier,
        [(upload.filename or "(no name)", upload.read()) for upload in uploads],
        max_pixels=current_app.config["MAX_IMAGE_PIXELS"],
        uncertain_below=web.uncertain_below(),
        thumbnail_side=BATCH_THUMBNAIL_SIDE,
    )
    rows = [(r, *web.encode_thumbnail(r.thumbnail, BATCH_THUMBNAIL_SIDE)) for r in results if r.ok]
    csv_text = write_csv(results, classifier.labels)
    current_app.logger.info("Batch: %d files, %d classified", len(results), sum(r.ok for r in results))
    response = make_response(
        render_template(
            "batch.html",
            rows=rows,
            differential=count_differential(results, classifier.labels),
            threshold=threshold,
            distance_rule=classifier.rule.tests_distance,
            csv_uri="data:text/csv;charset=utf-8;base64," + base64.b64encode(csv_text.encode("utf-8")).decode(),
            shorten=web.shorten,
        )
    )
    response.headers["Cache-Control"] = "no-store"  # the page embeds the person's images
    return response


def list_model_figures(model_path: Path) -> list[str]:
    """The PNG figures that sit next to the model (training curves, confusion matrices)."""
    return sorted(path.name for path in Path(model_path).parent.glob("*.png") if path.is_file())


def describe_figure(name: str) -> str:
    """Alt text and caption for a figure, from the names training/train.py and evaluate.py give them."""
    stem = name.rsplit(".", 1)[0]
    if stem.endswith("_curves"):
        return "Training and validation accuracy and loss per epoch"
    if stem.startswith("confusion_"):
        return "Confusion matrix on " + stem.removeprefix("confusion_").replace("_", " ")
    return stem.replace("_", " ")
