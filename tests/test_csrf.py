"""CSRF protection of the HTML forms (Flask-WTF's CSRFProtect), through a plain test client that behaves like a
browser (or an attacker)."""

from __future__ import annotations

import html
import io
import re

import pytest
from flask.testing import FlaskClient

from app import create_app
from tests.conftest import TOKEN_RE


@pytest.fixture
def browser(app):
    """A client that sends only what a browser would: no automatic token."""
    return FlaskClient(app, app.response_class, use_cookies=True)


def form_token(client) -> str:
    page = client.get("/").get_data(as_text=True)
    tokens = TOKEN_RE.findall(page)
    assert tokens, "the home page form has no csrf_token field"
    return tokens[0]


def post_file(client, data: bytes, token: str | None = None, path: str = "/predict"):
    form = {"file": (io.BytesIO(data), "cell.png")}
    if token is not None:
        form["csrf_token"] = token
    return client.post(path, data=form, content_type="multipart/form-data")


def error_text(response) -> str:
    text = html.unescape(response.get_data(as_text=True))
    match = re.search(r'<div class="alert" role="alert"[^>]*>(.*?)</div>', text, re.S)
    assert match, "no error message on the page"
    return match.group(1)


def test_every_post_form_on_the_home_page_carries_a_token(browser):
    page = browser.get("/").get_data(as_text=True)
    forms = re.findall(r"<form[^>]*method=\"post\"[^>]*>(.*?)</form>", page, re.S)
    assert forms
    for form in forms:
        assert TOKEN_RE.search(form)


def test_upload_with_the_page_token_is_classified(browser, make_image):
    response = post_file(browser, make_image(), form_token(browser))
    assert response.status_code == 200
    assert "Predicted Class:" in response.get_data(as_text=True)


def test_token_in_header_is_accepted(browser, make_image):
    token = form_token(browser)
    response = browser.post(
        "/predict",
        data={"file": (io.BytesIO(make_image()), "cell.png")},
        content_type="multipart/form-data",
        headers={"X-CSRF-Token": token},
    )
    assert response.status_code == 200


def test_missing_token_is_refused_on_the_home_page(browser, make_image):
    browser.get("/")
    response = post_file(browser, make_image())
    assert response.status_code == 400
    assert "missing its security token" in error_text(response)
    assert "Predict Blood Cell Type" in response.get_data(as_text=True)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c"])
def test_bad_token_is_refused(browser, make_image, token):
    form_token(browser)
    response = post_file(browser, make_image(), token)
    assert response.status_code == 400
    assert "security token" in error_text(response)


def test_token_from_another_browser_is_refused(app, browser, make_image):
    """An attacker can load the page and take a token, but not plant their session cookie in the victim's browser."""
    attacker = FlaskClient(app, app.response_class, use_cookies=True)
    stolen = form_token(attacker)
    form_token(browser)  # the victim has a session of their own
    response = post_file(browser, make_image(), stolen)
    assert response.status_code == 400
    assert "expired or is invalid" in error_text(response)


def test_token_without_session_cookie_is_refused(app, make_image):
    token = form_token(FlaskClient(app, app.response_class, use_cookies=True))
    cookieless = FlaskClient(app, app.response_class, use_cookies=False)
    response = post_file(cookieless, make_image(), token)
    assert response.status_code == 400


def test_token_from_another_secret_key_is_refused(tiny_model_path, make_image):
    other = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)})  # a fresh random key
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)})
    browser = FlaskClient(app, app.response_class, use_cookies=True)
    form_token(browser)
    foreign = form_token(FlaskClient(other, other.response_class, use_cookies=True))
    assert post_file(browser, make_image(), foreign).status_code == 400


def test_expired_token_is_refused(tiny_model_path, make_image):
    app = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "WTF_CSRF_TIME_LIMIT": -1})
    browser = FlaskClient(app, app.response_class, use_cookies=True)
    response = post_file(browser, make_image(), form_token(browser))
    assert response.status_code == 400
    assert "expired" in error_text(response)


def test_sample_form_is_protected_too(browser):
    browser.get("/")
    response = browser.post("/predict/sample", data={"name": "neutrophil"})
    assert response.status_code == 400
    assert "security token" in error_text(response)


def test_json_api_is_exempt(browser, make_image):
    response = post_file(browser, make_image(), path="/api/predict")
    assert response.status_code != 400 or "security token" not in response.get_data(as_text=True)
    assert response.status_code == 200


def test_unknown_pages_and_methods_keep_their_status(browser):
    assert browser.post("/nowhere").status_code == 404
    assert browser.put("/predict").status_code == 405


def test_session_cookie_is_httponly_and_samesite(browser):
    browser.get("/")
    cookie = browser.get_cookie("session")
    assert cookie is not None
    assert cookie.http_only
    assert cookie.same_site == "Lax"


def test_secret_key_comes_from_the_environment_or_is_random(tiny_model_path, monkeypatch):
    monkeypatch.delenv("FLASK_SECRET_KEY", raising=False)
    first = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)}).secret_key
    second = create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)}).secret_key
    assert first != second and len(first) >= 32
    monkeypatch.setenv("FLASK_SECRET_KEY", "k" * 40)
    assert create_app({"MODEL_PATH": str(tiny_model_path)}).secret_key == "k" * 40


def test_csrf_refusal_has_security_headers_and_no_internals(browser, make_image):
    response = post_file(browser, make_image(), "forged")
    body = response.get_data(as_text=True)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "Traceback" not in body and "BadSignature" not in body and ".py" not in body


def test_the_session_is_the_only_cookie(browser, make_image):
    post_file(browser, make_image(), form_token(browser))
    assert [cookie.key for cookie in browser._cookies.values()] == ["session"]


def test_https_form_post_needs_no_referer(browser, make_image):
    """The pages send Referrer-Policy: no-referrer, so the token alone is the check (WTF_CSRF_SSL_STRICT off)."""
    page = browser.get("/", base_url="https://localhost").get_data(as_text=True)
    response = browser.post(
        "/predict",
        base_url="https://localhost",
        data={"file": (io.BytesIO(make_image()), "cell.png"), "csrf_token": TOKEN_RE.findall(page)[0]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200
