"""HematoVision web app: the Flask application factory and the `python app.py` entry point.

The model is loaded once, here, at startup; a missing or broken model stops the app from starting
rather than letting it answer with made-up predictions.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from hematovision import api, batch, errors, gradcam, pages, web
from hematovision.classifier import ModelLoadError, load_classifier

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_PATH = ROOT / "model" / "blood_cell_model.h5"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000

# Every form POST must carry {{ csrf_token() }}: a signed copy of a secret kept in the session cookie, which
# another site can neither read nor set. The JSON API keeps no cookies and is exempt.
csrf = CSRFProtect()
csrf.exempt(api.bp)


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: defaults, then FLASK_* environment variables, then `test_config`."""
    app = Flask(__name__)
    app.config.from_mapping(
        # Signs the session cookie that carries the CSRF secret, and the forms' tokens. Random per start unless
        # FLASK_SECRET_KEY is set: set it when several processes serve, or forms break across a restart.
        SECRET_KEY=os.urandom(32).hex(),
        SESSION_COOKIE_SAMESITE="Lax",  # the one cookie: HttpOnly (Flask's default) and not sent by other sites
        WTF_CSRF_TIME_LIMIT=8 * 3600,  # seconds: a form left open for a working day still submits
        # The token is the whole check: no Referer test on HTTPS, since the pages send Referrer-Policy: no-referrer.
        WTF_CSRF_SSL_STRICT=False,
        MODEL_PATH=str(DEFAULT_MODEL_PATH),
        MAX_CONTENT_LENGTH=16 * 1024 * 1024,
        MAX_IMAGE_PIXELS=40_000_000,
        INFERENCE_RUNTIME="tflite",  # or "tf.function" (FLASK_INFERENCE_RUNTIME): see hematovision/fast_runtime.py
        INFERENCE_POOL_SIZE=2,  # TFLite interpreters shared by the server's threads
        INFERENCE_THREADS=0,  # CPU threads per TFLite interpreter; 0: one per core
        MAX_BATCH_FILES=batch.DEFAULT_MAX_BATCH_FILES,  # files per request, on the page and the API
        MAX_CELLS_PER_IMAGE=batch.MAX_CELLS_PER_IMAGE,  # white cells classified per image, those nearest the centre
        # A top (calibrated) probability under this is answered "uncertain"; None: the model's fitted threshold.
        UNCERTAIN_BELOW=batch.DEFAULT_UNCERTAIN_BELOW,
        # Shifted copies per axis behind each Grad-CAM heatmap (hematovision/gradcam.py): 1 = the plain 7x7 map.
        GRADCAM_SHIFTS=gradcam.DEFAULT_SHIFTS,
        GRADCAM_METHOD=gradcam.DEFAULT_METHOD,  # "gradcam++" or "gradcam": how its channels are weighted
        # Load Keras and trace the heatmap in a background thread after start-up, so that the first heatmap asked
        # for is as quick as the others. None: yes, unless TESTING (the tests do not pay for it unless they ask).
        PREPARE_HEATMAP_IN_BACKGROUND=None,
    )
    app.config.from_prefixed_env()  # e.g. FLASK_MODEL_PATH, FLASK_MAX_CONTENT_LENGTH
    if test_config:
        app.config.from_mapping(test_config)
    if app.config["GRADCAM_METHOD"] not in gradcam.METHODS:  # fail at start, not on the first explained image
        raise ValueError(f"GRADCAM_METHOD must be one of {', '.join(gradcam.METHODS)}")

    # Raises ModelLoadError with a clear message: there is deliberately no fallback model.
    app.extensions[web.EXTENSION_KEY] = load_classifier(
        app.config["MODEL_PATH"],
        runtime=app.config["INFERENCE_RUNTIME"],
        pool_size=int(app.config["INFERENCE_POOL_SIZE"]),
        num_threads=int(app.config["INFERENCE_THREADS"]) or None,
    )

    app.request_class = web.InMemoryRequest  # uploads never touch the disk
    app.register_blueprint(web.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    errors.init_app(app)  # JSON under /api/, pages elsewhere
    csrf.init_app(app)
    app.after_request(web.add_security_headers)
    prepare = app.config["PREPARE_HEATMAP_IN_BACKGROUND"]
    if prepare or (prepare is None and not app.testing):
        web.start_heatmap_preparation(app)  # a daemon thread: create_app and the first page do not wait for it
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the HematoVision web app.")
    parser.add_argument(
        "--host",
        default=os.environ.get("FLASK_RUN_HOST", DEFAULT_HOST),
        help=f"address to listen on (env FLASK_RUN_HOST; default {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=int,  # argparse also converts a string default, so a bad FLASK_RUN_PORT gets a clean error
        default=os.environ.get("FLASK_RUN_PORT", str(DEFAULT_PORT)),
        help=f"port to listen on (env FLASK_RUN_PORT; default {DEFAULT_PORT})",
    )
    return parser.parse_args(argv)


def serve(app: Flask, host: str, port: int) -> None:
    """Serve with waitress when installed, else Flask's own server. The debugger is never enabled:
    it would let anyone who can reach the page run code on this machine."""
    try:
        from waitress import serve as waitress_serve
    except ImportError:
        app.run(host=host, port=port, debug=False, use_reloader=False)
        return
    # waitress buffers request bodies over 512 KB in a temporary file; keep every allowed upload in memory
    # instead (MAX_CONTENT_LENGTH bounds it). The extra MiB leaves room for the multipart envelope, so
    # slightly-too-large uploads still reach Flask and get the friendly 413 page.
    body_limit = int(app.config["MAX_CONTENT_LENGTH"]) + 1024 * 1024
    waitress_serve(app, host=host, port=port, max_request_body_size=body_limit, inbuf_overflow=body_limit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app()
    except ModelLoadError as exc:
        print(f"HematoVision cannot start: {exc}", file=sys.stderr)
        return 1
    print(f"HematoVision is running at http://{args.host}:{args.port}/ (press Ctrl+C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is the normal way to stop: no traceback
        serve(app, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
