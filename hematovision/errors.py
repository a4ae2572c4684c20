"""Every error answer of the app, in one place: JSON under /api/, an HTML page everywhere else.

Flask raises some errors before any view runs (404, 405, a body over MAX_CONTENT_LENGTH: 413, a refused CSRF
token: 400), so they are handled here, at the app level, and told apart by the request's path. Under /api/ the
body is always `{"error": {"status": N, "message": "..."}}`; the pages show the home page with the message (the
upload errors) or the error page. Neither ever shows the exception text or a traceback.
"""

from __future__ import annotations

from flask import Flask, current_app, jsonify, make_response, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from hematovision.web import render_home

API_PREFIX = "/api"
CSRF_MISSING = "The form was missing its security token. Please reload the page and try again."
CSRF_INVALID = "The form's security token has expired or is invalid. Please reload the page and try again."


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, handle_http_error)  # every 4xx/5xx, and unhandled exceptions (500)
    app.register_error_handler(CSRFError, handle_csrf_error)  # a 400 of its own: a clearer message


def json_error(status: int, message: str):
    """The API's error answer (also used by its views for the errors they find themselves)."""
    return jsonify({"error": {"status": status, "message": message}}), status


def wants_json() -> bool:
    return request.path == API_PREFIX or request.path.startswith(API_PREFIX + "/")


def handle_http_error(error: HTTPException):
    status = error.code or 500
    response = make_response(api_error(error, status) if wants_json() else page_error(error, status))
    valid_methods = getattr(error, "valid_methods", None)
    if status == 405 and valid_methods:
        response.headers["Allow"] = ", ".join(valid_methods)  # keep what HTTP requires of a 405
    return response


def handle_csrf_error(error: CSRFError):
    """A form posted without this browser's token (hematovision's forms carry it: {{ csrf_token() }})."""
    if wants_json():  # the API is exempt from the check; this only answers a route added there by mistake
        return handle_http_error(error)
    current_app.logger.warning("CSRF check failed for %s %s: %s", request.method, request.path, error.description)
    message = CSRF_MISSING if error.description == "The CSRF token is missing." else CSRF_INVALID
    return render_home(message, 400)


def api_error(error: HTTPException, status: int):
    if status == 413:
        max_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        message = f"The request is too large. The limit is {max_mb:g} MB in all."
    elif status == 404:
        message = "There is no API endpoint at this address."
    elif status == 405:
        message = "This endpoint does not accept that method."
    elif status >= 500:
        message = "The server could not finish the request."  # never the exception text
    else:
        message = error.description or "Bad request."
    return json_error(status, message)


def page_error(error: HTTPException, status: int):
    if status == 413:  # an upload too large: the home page, with its form, says so
        max_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        return render_home(f"The file is too large. The limit is {max_mb:g} MB.", 413)
    if status == 404:
        return error_page(404, "Page not found", "There is no page at this address.")
    if status == 405:
        return error_page(405, "Not allowed", "This page cannot be used that way.")
    if status == 500:  # Flask has already logged the original exception with its traceback
        return error_page(500, "Something went wrong", "The server could not finish your request.")
    return error_page(status, error.name, "The server could not handle this request.")


def error_page(status: int, title: str, message: str):
    return render_template("error.html", status=status, title=title, message=message), status
