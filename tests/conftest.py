"""Shared fixtures: a tiny but real Keras model (built once per session), the app, and in-memory images."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageDraw

from app import create_app

TOKEN_RE = re.compile(r'<input type="hidden" name="csrf_token" value="([^"]+)">')
LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def drawn_smear(red_cells=(225, 150, 160), rectangle: bool = False) -> Image.Image:
    """A drawn 320x240 smear: 40 discs of the given colour round one violet white cell (its nucleus a disc, or a
    rectangle)."""
    rng = np.random.default_rng(0)
    smear = Image.new("RGB", (320, 240), (238, 232, 228))
    draw = ImageDraw.Draw(smear)
    for x, y in rng.integers((0, 0), (320, 240), size=(40, 2)):
        if not (120 < x < 200 and 80 < y < 160):
            draw.ellipse((x - 14, y - 14, x + 14, y + 14), fill=red_cells)
    draw.ellipse((135, 95, 185, 145), fill=(200, 170, 210))  # cytoplasm
    if rectangle:
        draw.rectangle((140, 100, 180, 140), fill=(110, 50, 150))
    else:
        draw.ellipse((142, 102, 178, 138), fill=(110, 50, 150))
    return smear


def make_image(fmt: str = "PNG", mode: str = "RGB", size: tuple[int, int] = (320, 240), **save_args) -> bytes:
    """Encoded image bytes made in memory: drawn_smear() (the cell finder finds its white cell from 32x32 up),
    tinted by a gradient and resized, so that different images give different predictions."""
    smear = drawn_smear()
    ramp = np.asarray(Image.linear_gradient("L").resize((320, 240)), np.float32)[..., None] / 255
    tint = 0.85 + 0.15 * np.concatenate([ramp, ramp[:, ::-1], np.ones_like(ramp)], axis=-1)
    rgb = Image.fromarray((np.asarray(smear, np.float32) * tint).astype(np.uint8)).resize(size)
    gradient = Image.linear_gradient("L").resize(size)
    if mode == "RGB":
        image = rgb
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(size))
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(gradient, dtype=np.uint16) * 257)  # full 16-bit range
    else:
        image = rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


class CsrfClient(FlaskClient):
    """A test client that sends the CSRF token as a browser's form would, on every POST outside /api/: it loads
    the home page once, as a browser does before it can post, and keeps the form's token (and the session cookie).
    Tests of the CSRF check itself use a plain FlaskClient (see tests/test_csrf.py)."""

    _token: str | None = None

    def csrf_token(self) -> str:
        if self._token is None:
            page = super().get("/").get_data(as_text=True)
            match = TOKEN_RE.search(page)
            assert match, "the home page form has no csrf_token field"
            self._token = match.group(1)
        return self._token

    def post(self, path="/", *args, **kwargs):
        if isinstance(path, str) and not path.startswith("/api/"):
            headers = dict(kwargs.pop("headers", None) or {})
            headers.setdefault("X-CSRF-Token", self.csrf_token())
            kwargs["headers"] = headers
        return super().post(path, *args, **kwargs)


@pytest.fixture(autouse=True)
def csrf_sending_test_client(monkeypatch):
    """Every app's test_client() in the tests behaves like a browser that loaded the form first."""
    monkeypatch.setattr(Flask, "test_client_class", CsrfClient)


@pytest.fixture(name="make_image")
def make_image_fixture():
    return make_image


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The shipped MobileNetV2's input contract (uint8-range RGB 224x224 in, softmax out) in a few KB."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(1234)
    inputs = keras.Input((224, 224, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = layers.Conv2D(8, 7, strides=4, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)

    path = tmp_path_factory.mktemp("model") / "tiny_model.h5"
    model.save(path)
    metadata = {"labels": LABELS, "image_size": [224, 224], "note": "tiny random test model"}
    path.with_suffix(".json").write_text(json.dumps(metadata), encoding="utf-8")
    return path


@pytest.fixture
def app(tiny_model_path):
    return create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path)})


@pytest.fixture
def client(app):
    return app.test_client()
