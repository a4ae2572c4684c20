"""The JSON API: /api/predict, /api/health, /api/model and its OpenAPI document.

Every error under /api/ is JSON, `{"error": {"status": N, "message": "..."}}`, including the 404, 405 and 413
that Flask raises before a view runs: init_app wraps the page error handlers for /api/ paths.
In a batch, a file that is not a usable image gets its own error entry; the other files are still classified.
"""

from __future__ import annotations

from functools import wraps

from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from hematovision.abstention import LOW_CONFIDENCE, UNLIKE_TRAINING
from hematovision.batch import ItemResult, classify_files
from hematovision.fast_runtime import sha256_of
from hematovision.web import uncertain_below

API_PREFIX = "/api"
VERSION_KEY = "hematovision.model_version"

bp = Blueprint("api", __name__, url_prefix=API_PREFIX)


def init_app(app: Flask) -> None:
    """Register the API. Call it after the page error handlers are registered: it wraps them so that
    requests under /api/ get JSON errors and pages keep their HTML ones."""
    app.register_blueprint(bp)
    for handlers in app.error_handler_spec[None].values():
        for exc_class, handler in list(handlers.items()):
            handlers[exc_class] = _json_under_api(handler)
    classifier = app.extensions["hematovision"]
    app.extensions[VERSION_KEY] = describe_model_version(classifier.metadata, classifier.path)


def describe_model_version(metadata: dict, model_path) -> str:
    """The metadata's creation time when it has one, else the start of the model file's SHA-256."""
    if metadata.get("created"):
        return str(metadata["created"])
    return "sha256:" + sha256_of(model_path)[:12]


# --- views -------------------------------------------------------------------------------------------


@bp.post("/predict")
def predict():
    uploads = request.files.getlist("file")
    if not uploads:
        return error_response(400, "No file was sent. Send one or more images in the multipart field 'file'.")
    max_files = int(current_app.config["MAX_BATCH_FILES"])
    if len(uploads) > max_files:
        return error_response(413, f"Too many files: {len(uploads)}. The limit is {max_files} per request.")
    classifier = current_app.extensions["hematovision"]
    results = classify_files(
        classifier,
        [(upload.filename or "", upload.read()) for upload in uploads],
        max_pixels=current_app.config["MAX_IMAGE_PIXELS"],
        uncertain_below=uncertain_below(),
    )
    if len(results) == 1 and not results[0].ok:
        # One file: answer with its own status (400/413/415), as the page does.
        return error_response(results[0].error.status, results[0].error.message)
    current_app.logger.info("API classified %d of %d files", sum(r.ok for r in results), len(results))
    return jsonify({"results": [describe_result(r) for r in results]})


@bp.get("/health")
def health():
    return jsonify(
        {
            "status": "ok",
            "model_loaded": current_app.extensions.get("hematovision") is not None,
            "model_version": current_app.extensions.get(VERSION_KEY),
        }
    )


@bp.get("/model")
def model_metadata():
    return jsonify(current_app.extensions["hematovision"].metadata)


@bp.get("/openapi.json")
def openapi():
    labels = current_app.extensions["hematovision"].labels
    return jsonify(build_openapi(labels, int(current_app.config["MAX_BATCH_FILES"])))


# --- helpers -----------------------------------------------------------------------------------------


def describe_result(result: ItemResult) -> dict:
    if not result.ok:
        return {"filename": result.filename, "error": {"status": result.error.status, "message": result.error.message}}
    return {
        "filename": result.filename,
        "label": result.label,
        "probabilities": result.probabilities,
        "uncertain": result.uncertain,
        "reason": result.reason,
    }


def error_response(status: int, message: str):
    return jsonify({"error": {"status": status, "message": message}}), status


def _json_under_api(handler):
    @wraps(handler)
    def handle(error):
        if not request.path.startswith(API_PREFIX + "/") and request.path != API_PREFIX:
            return handler(error)
        status = error.code if isinstance(error, HTTPException) and error.code else 500
        message = _api_message(error, status)
        response = current_app.make_response(error_response(status, message))
        valid = getattr(error, "valid_methods", None)
        if status == 405 and valid:
            response.headers["Allow"] = ", ".join(valid)
        return response

    return handle


def _api_message(error, status: int) -> str:
    if status == 413:
        max_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        return f"The request is too large. The limit is {max_mb:g} MB in all."
    if status == 404:
        return "There is no API endpoint at this address."
    if status == 405:
        return "This endpoint does not accept that method."
    if status >= 500:
        return "The server could not finish the request."  # never the exception text
    return error.description if isinstance(error, HTTPException) and error.description else "Bad request."


def build_openapi(labels: list[str], max_files: int) -> dict:
    """A hand-written OpenAPI 3.1 description of the API (kept next to the views it describes)."""
    error = {"$ref": "#/components/schemas/Error"}

    def error_reply(text: str) -> dict:
        return {"description": text, "content": {"application/json": {"schema": error}}}

    probability = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "HematoVision API",
            "version": "1",
            "summary": "Classify images of stained white blood cells into " + ", ".join(labels) + ".",
            "description": (
                "A research tool, not a medical device. Probabilities are calibrated (temperature scaling fitted "
                "on validation data). `uncertain` is true when the answer is \"uncertain / not a white blood "
                "cell\" rather than `label`, and `reason` says why: `unlike_training_cells` when the image's "
                "features are far from every kind of training cell (it may not be a white-cell image, or comes "
                "from another microscope or stain), `low_confidence` when the top probability is below the "
                "model's fitted threshold (or the server's UNCERTAIN_BELOW setting). `label` is then only the "
                "model's forced choice among its classes. Neither test is perfect: see the model card."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": {
            "/api/predict": {
                "post": {
                    "operationId": "predict",
                    "summary": "Classify one or more images",
                    "description": (
                        f"Send up to {max_files} images in the multipart field `file`. The model runs once on "
                        "the whole batch. One file that is not a usable image fails the request with its own "
                        "status; in a batch of several, it gets an error entry and the others are classified."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {
                                        "file": {
                                            "type": "array",
                                            "maxItems": max_files,
                                            "items": {"type": "string", "contentMediaType": "application/octet-stream"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "One result per file, in the order sent",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Results"}}},
                        },
                        "400": error_reply("No file, an empty file, or a damaged or multi-frame image"),
                        "413": error_reply("The request, an image's pixel count, or the number of files is too large"),
                        "415": error_reply("The file is not a JPEG, PNG, BMP or TIFF image"),
                    },
                }
            },
            "/api/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Is the server up with its model loaded",
                    "responses": {
                        "200": {
                            "description": "Server status",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        }
                    },
                }
            },
            "/api/model": {
                "get": {
                    "operationId": "model",
                    "summary": "The model's metadata: labels, data, training recipe and figures",
                    "responses": {
                        "200": {
                            "description": "The metadata JSON written by training/train.py",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["status", "message"],
                            "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
                        }
                    },
                },
                "Prediction": {
                    "type": "object",
                    "required": ["filename", "label", "probabilities", "uncertain", "reason"],
                    "properties": {
                        "filename": {"type": "string"},
                        "label": {"type": "string", "enum": list(labels)},
                        "probabilities": {
                            "type": "object",
                            "properties": {label: probability for label in labels},
                            "additionalProperties": False,
                        },
                        "uncertain": {"type": "boolean"},
                        "reason": {
                            "type": ["string", "null"],
                            "enum": [UNLIKE_TRAINING, LOW_CONFIDENCE, None],
                            "description": "Why the answer is uncertain; null when it is not",
                        },
                    },
                },
                "ItemError": {
                    "type": "object",
                    "required": ["filename", "error"],
                    "properties": {
                        "filename": {"type": "string"},
                        "error": {"$ref": "#/components/schemas/Error/properties/error"},
                    },
                },
                "Results": {
                    "type": "object",
                    "required": ["results"],
                    "properties": {
                        "results": {
                            "type": "array",
                            "items": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/Prediction"},
                                    {"$ref": "#/components/schemas/ItemError"},
                                ]
                            },
                        }
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "model_loaded", "model_version"],
                    "properties": {
                        "status": {"type": "string", "const": "ok"},
                        "model_loaded": {"type": "boolean"},
                        "model_version": {"type": ["string", "null"]},
                    },
                },
            }
        },
    }
