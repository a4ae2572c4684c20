"""Pages beside the upload form: the model card with its figures, and the sample images.

Views stay thin: a sample's result is the same page as an upload's (hematovision.web).
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, current_app, render_template, request, send_from_directory

from hematovision import web
from hematovision.classifier import public_metadata
from hematovision.imaging import decode_image

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
        meta=public_metadata(classifier.metadata),
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


# --- helpers -----------------------------------------------------------------------------------------


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
