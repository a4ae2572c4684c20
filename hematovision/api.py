"""The JSON API: /api/predict, /api/health, /api/model and its OpenAPI document (hematovision.openapi).

Every error under /api/ is JSON, `{"error": {"status": N, "message": "..."}}`: the views answer the errors they
find, hematovision.errors those Flask raises before a view runs (404, 405, 413). The API keeps no cookies and
is exempt from the forms' CSRF check. In a batch, a file that is not a usable image gets its own error entry;
the other files are still classified. Each result lists every white cell found in the image (`cells`, with its box in
the image's pixels) and repeats the primary cell's answer (the one nearest the image centre) at the top level.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from hematovision.batch import ItemResult, classify_files
from hematovision.classifier import public_metadata
from hematovision.errors import API_PREFIX, json_error
from hematovision.openapi import build_openapi
from hematovision.web import get_classifier, max_cells_per_image, uncertain_below

DECIMALS = 4  # probabilities in the answers: more digits would only be noise

bp = Blueprint("api", __name__, url_prefix=API_PREFIX)


# --- views -------------------------------------------------------------------------------------------


@bp.post("/predict")
def predict():
    uploads = request.files.getlist("file")
    if not uploads:
        return json_error(400, "No file was sent. Send one or more images in the multipart field 'file'.")
    max_files = int(current_app.config["MAX_BATCH_FILES"])
    if len(uploads) > max_files:
        return json_error(413, f"Too many files: {len(uploads)}. The limit is {max_files} per request.")
    results = classify_files(
        get_classifier(),
        [(upload.filename or "", upload.read()) for upload in uploads],
        max_pixels=current_app.config["MAX_IMAGE_PIXELS"],
        uncertain_below=uncertain_below(),
        max_cells=max_cells_per_image(),
    )
    if len(results) == 1 and not results[0].ok:
        # One file: answer with its own status (400/413/415), as the page does.
        return json_error(results[0].error.status, results[0].error.message)
    current_app.logger.info("API: %d of %d files read, %d white cells", sum(r.ok for r in results), len(results),
                            sum(len(r.cells) for r in results))
    return jsonify({"results": [describe_result(r) for r in results]})


@bp.get("/health")
def health():
    classifier = get_classifier()
    return jsonify(
        {
            "status": "ok",
            "model_loaded": classifier is not None,
            "model_version": describe_model_version(classifier.metadata, classifier.sha256),
        }
    )


@bp.get("/model")
def model_metadata():
    return jsonify(public_metadata(get_classifier().metadata))


@bp.get("/openapi.json")
def openapi():
    return jsonify(build_openapi(get_classifier().labels, int(current_app.config["MAX_BATCH_FILES"]),
                                 max_cells_per_image()))


# --- helpers -----------------------------------------------------------------------------------------


def describe_model_version(metadata: dict, model_sha256: str) -> str:
    """The metadata's creation time when it has one, else the start of the model file's SHA-256."""
    if metadata.get("created"):
        return str(metadata["created"])
    return "sha256:" + model_sha256[:12]


def describe_result(result: ItemResult) -> dict:
    """One file's answer: every white cell found, and at the top level the primary cell's answer (the cell nearest
    the image centre); with no white cell, `cells` is empty and the answer is uncertain with no label."""
    if not result.ok:
        return {"filename": result.filename, "error": {"status": result.error.status, "message": result.error.message}}
    primary = result.primary_cell
    return {
        "filename": result.filename,
        "label": result.label,
        "probabilities": rounded(primary.probabilities) if primary else None,
        "uncertain": result.uncertain,
        "reason": result.reason,
        "primary": result.primary,
        "cells_found": result.cells_found,
        "cells": [
            {
                "box": list(cell.box),
                "label": cell.label,
                "probabilities": rounded(cell.probabilities),
                "uncertain": cell.uncertain,
                "reason": cell.reason,
            }
            for cell in result.cells
        ],
    }


def rounded(probabilities: dict[str, float]) -> dict[str, float]:
    return {label: round(p, DECIMALS) for label, p in probabilities.items()}
