"""CSRF protection for the HTML forms, without new dependencies.

Each browser gets a random nonce in Flask's signed session cookie (HttpOnly, SameSite=Lax). Forms carry
`csrf_token()`: the nonce signed with SECRET_KEY and a timestamp (itsdangerous, which Flask already uses).
A POST outside /api/ must send that token, in the form field `csrf_token` or the `X-CSRF-Token` header, and
it must match the nonce in the session: another site can neither read the token nor set the cookie.
The JSON API (/api/...) keeps no cookies or state and is exempt.

Every HTML form that POSTs must include:

    <input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
"""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, current_app, request, session
from itsdangerous import BadData, URLSafeTimedSerializer

FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
SESSION_KEY = "csrf_nonce"
SALT = "hematovision-csrf"
DEFAULT_TIME_LIMIT = 8 * 3600  # a form left open for a working day still submits
EXEMPT_PREFIXES = ("/api/",)
MISSING_MESSAGE = "The form was missing its security token. Please reload the page and try again."
INVALID_MESSAGE = "The form's security token has expired or is invalid. Please reload the page and try again."


class CsrfError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _serializer(app: Flask) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(app.secret_key, salt=SALT)


def generate_token(session_data=None, app: Flask | None = None) -> str:
    """The token for this browser (creating its nonce on first use). A Jinja global: {{ csrf_token() }}.
    Tests may pass a session from `client.session_transaction()` and the app."""
    data = session if session_data is None else session_data
    nonce = data.get(SESSION_KEY)
    if not isinstance(nonce, str):
        nonce = secrets.token_urlsafe(32)
        data[SESSION_KEY] = nonce
    return _serializer(app or current_app).dumps(nonce)


def validate(token: str | None) -> None:
    if not token:
        raise CsrfError(MISSING_MESSAGE)
    nonce = session.get(SESSION_KEY)
    if not isinstance(nonce, str):  # no session cookie: the page was never loaded here, or cookies are off
        raise CsrfError(INVALID_MESSAGE)
    time_limit = int(current_app.config.get("CSRF_TIME_LIMIT", DEFAULT_TIME_LIMIT))
    try:
        signed = _serializer(current_app).loads(token, max_age=time_limit)
    except BadData as exc:
        raise CsrfError(INVALID_MESSAGE) from exc
    if not isinstance(signed, str) or not hmac.compare_digest(signed, nonce):
        raise CsrfError(INVALID_MESSAGE)


def protect():
    """before_request hook: check every state-changing request outside the JSON API."""
    if request.method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        return None
    if request.path.startswith(EXEMPT_PREFIXES) or request.routing_exception is not None:
        return None  # the API; or no such page/method: let the 404/405 be answered as such
    # The header first: reading request.form parses the body (bounded by MAX_CONTENT_LENGTH: a 413 here is fine).
    token = request.headers.get(HEADER) or request.form.get(FIELD)
    try:
        validate(token)
    except CsrfError as exc:
        from hematovision.web import render_home  # late: web imports heavy modules

        current_app.logger.warning("CSRF check failed for %s %s: %s", request.method, request.path, exc.message)
        return render_home(exc.message, 400)
    return None


def init_app(app: Flask) -> None:
    app.config.setdefault("CSRF_TIME_LIMIT", DEFAULT_TIME_LIMIT)
    if not app.config.get("SESSION_COOKIE_SAMESITE"):  # Flask's default is None (unset)
        app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.jinja_env.globals["csrf_token"] = generate_token
    app.before_request(protect)
