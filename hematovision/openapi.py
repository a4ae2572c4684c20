"""The OpenAPI 3.1 document of the JSON API (hematovision.api serves it at /api/openapi.json), written by hand."""

from __future__ import annotations

from hematovision.abstention import LOW_CONFIDENCE, OTHER_TYPE, UNLIKE_TRAINING
from hematovision.batch import MAX_CELLS_PER_IMAGE, NO_WHITE_CELL


def build_openapi(labels: list[str], max_files: int, max_cells: int = MAX_CELLS_PER_IMAGE) -> dict:
    """The document for a model with these `labels` and a server taking up to `max_files` files per request and
    classifying up to `max_cells` white cells per image."""
    error = {"$ref": "#/components/schemas/Error"}

    def error_reply(text: str) -> dict:
        return {"description": text, "content": {"application/json": {"schema": error}}}

    probability = {"type": "number", "minimum": 0, "maximum": 1, "description": "Calibrated, rounded to 4 decimals"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "HematoVision API",
            "version": "1",
            "summary": "Find the white blood cells in stained smear images and classify each into "
            + ", ".join(labels) + ".",
            "description": (
                "A research tool, not a medical device. Every white blood cell found in an image is boxed "
                "(`cells[].box`: xmin, ymin, xmax, ymax in the image's pixels, after its EXIF orientation; xmax and "
                "ymax exclusive) and classified on its own crop; the top-level `label`, `probabilities`, "
                "`uncertain` and `reason` repeat the answer of the primary cell, `cells[primary]`: the one whose "
                "box centre is nearest the image centre. An image without a white cell has `cells: []`, "
                f"`label: null`, `uncertain: true` and `reason: \"{NO_WHITE_CELL}\"`. At most {max_cells} cells "
                "are classified per image, those nearest its centre; `cells_found` counts all that were found. "
                "Probabilities are calibrated (temperature scaling fitted on validation data). `uncertain` is true "
                "when the answer is \"uncertain / not a white blood cell\" rather than `label`, and `reason` says "
                "why: `unlike_training_cells` when the cell's features are far from every kind of training cell "
                "(it may not be a white cell, or comes from another microscope or stain), `other_cell_type` when it "
                "looks like a white cell of a type the model does not classify (a basophil), `low_confidence` when "
                "the top probability is below the model's fitted threshold (or the server's UNCERTAIN_BELOW "
                "setting). `label` is then only the model's forced choice among its classes. Neither test is "
                "perfect: see the model card."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": {
            "/api/predict": {
                "post": {
                    "operationId": "predict",
                    "summary": "Find and classify the white cells of one or more images",
                    "description": (
                        f"Send up to {max_files} images in the multipart field `file`. One file that is not a "
                        "usable image fails the request with its own status; in a batch of several, it gets an "
                        "error entry and the others are classified."
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
                    "description": "Paths of the machine it was trained on are cut to their last part.",
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
                    "required": ["filename", "label", "probabilities", "uncertain", "reason", "primary",
                                 "cells_found", "cells"],
                    "properties": {
                        "filename": {"type": "string"},
                        "label": {
                            "type": ["string", "null"],
                            "enum": [*labels, None],
                            "description": "The primary cell's class; null when no white cell was found",
                        },
                        "probabilities": {
                            "oneOf": [{"$ref": "#/components/schemas/Probabilities"}, {"type": "null"}],
                            "description": "The primary cell's; null when no white cell was found",
                        },
                        "uncertain": {"type": "boolean", "description": "The primary cell's; true with no cell"},
                        "reason": {
                            "type": ["string", "null"],
                            "enum": [UNLIKE_TRAINING, OTHER_TYPE, LOW_CONFIDENCE, NO_WHITE_CELL, None],
                            "description": "Why the answer is uncertain; null when it is not",
                        },
                        "primary": {
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "description": "Index in `cells` of the primary cell (nearest the image centre)",
                        },
                        "cells_found": {
                            "type": "integer",
                            "minimum": 0,
                            "description": f"White cells found; more than len(cells) when over {max_cells}",
                        },
                        "cells": {
                            "type": "array",
                            "maxItems": max_cells,
                            "items": {"$ref": "#/components/schemas/Cell"},
                            "description": "Every white cell classified, top to bottom, then left to right",
                        },
                    },
                },
                "Cell": {
                    "type": "object",
                    "required": ["box", "label", "probabilities", "uncertain", "reason"],
                    "properties": {
                        "box": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 0},
                            "minItems": 4,
                            "maxItems": 4,
                            "description": "xmin, ymin, xmax, ymax in the image's pixels (xmax, ymax exclusive)",
                        },
                        "label": {"type": "string", "enum": list(labels)},
                        "probabilities": {"$ref": "#/components/schemas/Probabilities"},
                        "uncertain": {"type": "boolean"},
                        "reason": {
                            "type": ["string", "null"],
                            "enum": [UNLIKE_TRAINING, OTHER_TYPE, LOW_CONFIDENCE, None],
                            "description": "Why this cell's answer is uncertain; null when it is not",
                        },
                    },
                },
                "Probabilities": {
                    "type": "object",
                    "properties": {label: probability for label in labels},
                    "required": list(labels),
                    "additionalProperties": False,
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
