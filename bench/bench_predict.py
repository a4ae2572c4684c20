"""Inference and serving benchmark for HematoVision.

    python bench/bench_predict.py                 # everything, ~2-3 minutes on 2 idle cores
    python bench/bench_predict.py --runs 50 --requests 30 --skip-startup   # quicker

Measures, on the shipped model (or --model):
  1. model time for one 224x224 image: model.predict, eager model(x), tf.function, and the fast runtime (TFLite);
  2. POST /predict latency through the Flask test client with a real 320x240 JPEG (decode, resize, model,
     thumbnail, HTML page);
  3. the same request through the naive path of a typical project (save the upload to a temporary file,
     keras.utils.load_img(target_size=(224, 224)), img_to_array / 255, model.predict), and the ratio;
  4. POST /api/predict with 32 images in one request: images per second;
  5. POST /api/predict with one 320x240 single-cell image, and with a 640x480 field holding one white cell (the
     committed BCCD field tests/data/fields/bccd_00001_one_wbc.jpg, 320x240, enlarged 2x); finding the white cells
     alone in that field;
  6. start-up of `python app.py --port N` until the first 200, and its resident memory after 30 requests.
Prints a table and writes bench/results/bench_predict.json. Targets are from issue 5. The server's start-up
preparation of the heatmap model (a few seconds, once, in a background thread) is switched off where no heatmap is
asked for: it would otherwise land in the first timed requests.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common  # bench/: the script's own folder

TARGETS = {
    "model_fast_runtime_median_ms": 5.0,
    "post_predict_median_ms": 15.0,
    "speedup_vs_naive_min": 5.0,
    "startup_s": 5.0,
    "rss_mb": 800.0,
    "api_batch_images_per_s": 100.0,
}


def bench_model(model_path: Path, runs: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from hematovision.classifier import load_classifier
    from hematovision.imaging import prepare_field

    name, data = _common.sample_jpeg()
    x = prepare_field(data).primary_crop[None].astype(np.float32)
    model = keras.models.load_model(model_path, compile=False)

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
    def serve(batch):
        return model(batch, training=False)

    fast = load_classifier(model_path, runtime="tflite")
    if fast.runtime != "tflite":
        raise SystemExit("the TFLite runtime could not be loaded: see the log above")
    results = {
        "model.predict": _common.time_calls(lambda: model.predict(x, verbose=0), runs),
        "eager model(x)": _common.time_calls(lambda: model(x, training=False).numpy(), runs),
        "tf.function": _common.time_calls(lambda: serve(x).numpy(), runs),
        "fast runtime (TFLite)": _common.time_calls(lambda: fast.run(x), runs),
        "TFLite + calibration + abstention": _common.time_calls(lambda: fast.assess(x), runs),
    }
    reference = serve(x).numpy()  # the network's own probabilities: compare before calibration
    results["test_time_views"] = int(fast.metadata.get("test_time_views", 1))
    results["max_abs_difference_tflite_vs_keras"] = float(np.abs(fast.run(x)[0] - reference).max())
    return results


def bench_api_batch(model_path: Path, requests: int, batch: int = 32) -> dict:
    """POST /api/predict with `batch` JPEGs in one request: images per second through the whole API."""
    from app import create_app

    name, data = _common.sample_jpeg()
    app = create_app({"MODEL_PATH": str(model_path), "PREPARE_HEATMAP_IN_BACKGROUND": False})
    client = app.test_client()

    def post():
        files = [(io.BytesIO(data), f"{i}_{name}") for i in range(batch)]
        response = client.post("/api/predict", data={"file": files}, content_type="multipart/form-data")
        assert response.status_code == 200, response.status_code
        assert len(response.get_json()["results"]) == batch

    timings = _common.time_calls(post, requests)
    return {"batch": batch, **timings, "images_per_s": round(batch / (timings["median_ms"] / 1000), 1)}


def field_640x480() -> bytes:
    """A 640x480 JPEG of a smear field with one white cell: the committed 320x240 BCCD field, enlarged 2x."""
    from PIL import Image

    image = Image.open(_common.ROOT / "tests" / "data" / "fields" / "bccd_00001_one_wbc.jpg").convert("RGB")
    buffer = io.BytesIO()
    image.resize((640, 480), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def bench_api_single(model_path: Path, requests: int) -> dict:
    """POST /api/predict with one image: a 320x240 single-cell sample, then a 640x480 field with one white cell;
    and the white-cell finder alone on that field (decoded array in)."""
    import numpy as np
    from PIL import Image

    from app import create_app
    from hematovision.cells import find_white_cells

    app = create_app({"MODEL_PATH": str(model_path), "PREPARE_HEATMAP_IN_BACKGROUND": False})
    client = app.test_client()
    result = {}
    for key, (name, data) in {"single_cell_320x240": _common.sample_jpeg(),
                              "field_640x480": ("field.jpg", field_640x480())}.items():
        def post(name=name, data=data):
            response = client.post("/api/predict", data={"file": (io.BytesIO(data), name)},
                                   content_type="multipart/form-data")
            assert response.status_code == 200, response.status_code
            return response.get_json()["results"][0]

        result[key] = {"cells_found": len(post()["cells"]), **_common.time_calls(post, requests)}
    rgb = np.asarray(Image.open(io.BytesIO(field_640x480())).convert("RGB"))
    result["find_white_cells_640x480"] = _common.time_calls(lambda: find_white_cells(rgb), requests)
    result["field_over_single_ratio"] = round(result["field_640x480"]["median_ms"]
                                              / result["single_cell_320x240"]["median_ms"], 2)
    return result


def _csrf_fields(client) -> dict:
    match = _common.TOKEN_RE.search(client.get("/").get_data(as_text=True))
    return {"csrf_token": match.group(1)} if match else {}


def bench_post_predict(model_path: Path, requests: int, explain: bool = False) -> dict:
    """POST /predict as the form sends it; `explain=True` ticks the form's Grad-CAM box (the heatmap is computed
    and drawn). The first explained request, which loads Keras and traces the graph, is left out of the timing."""
    from app import create_app

    name, data = _common.sample_jpeg()
    app = create_app({"MODEL_PATH": str(model_path), "PREPARE_HEATMAP_IN_BACKGROUND": explain})
    client = app.test_client()
    fields = {**_csrf_fields(client), **({"explain": "on"} if explain else {})}

    def post():
        response = client.post(
            "/predict", data={**fields, "file": (io.BytesIO(data), name)}, content_type="multipart/form-data"
        )
        assert response.status_code == 200, response.status_code
        assert not explain or b"data:image/jpeg;base64" in response.data, "no heatmap on the page"

    if explain:
        post()
    timings = _common.time_calls(post, requests)
    return {"runtime": app.extensions["hematovision"].runtime, "grad_cam": explain,
            **({"grad_cam_shifts": app.config["GRADCAM_SHIFTS"], "grad_cam_method": app.config["GRADCAM_METHOD"]}
               if explain else {}), **timings}


def naive_app(model_path: Path):
    """What a typical Flask + Keras project does per request. Our model scales pixels itself, so its answers
    are off here; this is for timing only, with the same network."""
    import keras
    import numpy as np
    from flask import Flask, render_template_string, request

    app = Flask("naive")
    model = keras.models.load_model(model_path, compile=False)
    labels = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]

    @app.post("/predict")
    def predict():
        upload = request.files["file"]
        handle, path = tempfile.mkstemp(suffix=os.path.splitext(upload.filename)[1])
        os.close(handle)
        try:
            upload.save(path)
            image = keras.utils.load_img(path, target_size=(224, 224))
            array = keras.utils.img_to_array(image) / 255.0
            probabilities = model.predict(np.expand_dims(array, 0), verbose=0)[0]
        finally:
            os.remove(path)
        label = labels[int(np.argmax(probabilities))]
        return render_template_string("<p>Predicted: {{ label }} ({{ p }})</p>", label=label, p=probabilities.max())

    return app


def bench_naive(model_path: Path, requests: int) -> dict:
    name, data = _common.sample_jpeg()
    client = naive_app(model_path).test_client()

    def post():
        response = client.post("/predict", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")
        assert response.status_code == 200, response.status_code

    return _common.time_calls(post, requests)


def bench_startup(repeats: int, requests: int) -> dict:
    """Wall time from spawning `python app.py` to the first 200 on GET /, then RSS after `requests` POSTs."""
    name, data = _common.sample_jpeg()
    times, memory = [], {}
    for attempt in range(repeats):
        port = _common.free_port()
        base = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        process = _common.start_server(port)
        try:
            times.append(_common.wait_until_serving(process, base, start))
            if attempt == repeats - 1:
                memory["after_start"] = _common.rss_mb(process.pid)
                client = _common.HttpClient(base)
                client.fetch_token()
                statuses = [client.post_files("/predict", [(name, data)])[0] for _ in range(requests)]
                memory[f"after_{requests}_requests"] = _common.rss_mb(process.pid)
                memory["statuses"] = sorted(set(statuses))
        finally:
            _common.stop_server(process)
    return {"startup_s": [round(t, 3) for t in times], "startup_median_s": round(statistics.median(times), 3),
            **memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_common.ROOT / "model" / "blood_cell_model.h5")
    parser.add_argument("--runs", type=int, default=200, help="model calls per variant (default 200)")
    parser.add_argument("--requests", type=int, default=100, help="POSTs per web variant (default 100)")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--label", default="", help="a note stored with the results, e.g. 'under load'")
    parser.add_argument("--out", default="bench_predict", help="results file name in bench/results/")
    args = parser.parse_args(argv)

    result = {"environment": _common.environment(), "label": args.label, "model": str(args.model),
              "runs": args.runs, "requests": args.requests, "targets": TARGETS}
    result["model_time_one_image"] = bench_model(args.model, args.runs)
    result["post_predict"] = bench_post_predict(args.model, args.requests)
    result["post_predict_with_grad_cam"] = bench_post_predict(args.model, max(5, args.requests // 5), explain=True)
    result["api_batch_32"] = bench_api_batch(args.model, max(5, args.requests // 10))
    result["api_single"] = bench_api_single(args.model, args.requests)
    result["naive_post_predict"] = bench_naive(args.model, args.requests)
    ours, naive = result["post_predict"]["median_ms"], result["naive_post_predict"]["median_ms"]
    result["speedup_vs_naive"] = round(naive / ours, 2)
    if not args.skip_startup:
        result["server"] = bench_startup(args.startup_repeats, 30)
    result["environment"]["load_average_at_end"] = _common.load_average()
    result["checks"] = checks(result)
    path = _common.write_results(args.out, result)
    print_table(result)
    print(f"\nwrote {path.relative_to(_common.ROOT)}")
    return 0


def checks(result: dict) -> dict:
    fast = result["model_time_one_image"]["fast runtime (TFLite)"]["median_ms"]
    found = {
        "model_fast_runtime_median_ms": (fast, fast <= TARGETS["model_fast_runtime_median_ms"]),
        "post_predict_median_ms": (result["post_predict"]["median_ms"],
                                   result["post_predict"]["median_ms"] <= TARGETS["post_predict_median_ms"]),
        "speedup_vs_naive_min": (result["speedup_vs_naive"],
                                 result["speedup_vs_naive"] >= TARGETS["speedup_vs_naive_min"]),
    }
    found["api_batch_images_per_s"] = (result["api_batch_32"]["images_per_s"],
                                       result["api_batch_32"]["images_per_s"] >= TARGETS["api_batch_images_per_s"])
    server = result.get("server")
    if server:
        found["startup_s"] = (server["startup_median_s"], server["startup_median_s"] <= TARGETS["startup_s"])
        peak = max(v["rss_mb"] for k, v in server.items() if k.startswith("after_"))
        found["rss_mb"] = (peak, peak <= TARGETS["rss_mb"])
    return {name: {"value": value, "target": TARGETS[name], "met": met} for name, (value, met) in found.items()}


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\nHematoVision benchmark {result['label']}  ({env['cpus']} CPUs, load average "
          f"{env['load_average_at_start']} -> {env['load_average_at_end']})")
    print(f"\n{'model time, one 224x224 image':34} {'median ms':>10} {'p90 ms':>10} {'runs':>6}")
    for name, row in result["model_time_one_image"].items():
        if isinstance(row, dict):
            print(f"{name:34} {row['median_ms']:10.2f} {row['p90_ms']:10.2f} {row['n']:6d}")
    difference = result["model_time_one_image"]["max_abs_difference_tflite_vs_keras"]
    print(f"max |TFLite - Keras| probability: {difference:.2e}")
    print(f"\n{'POST /predict, 320x240 JPEG':34} {'median ms':>10} {'p90 ms':>10} {'reqs':>6}")
    runtime = result["post_predict"]["runtime"]
    for name, key in ((f"HematoVision ({runtime})", "post_predict"),
                      ("HematoVision, Grad-CAM box ticked", "post_predict_with_grad_cam"),
                      ("naive temp file + load_img + predict", "naive_post_predict")):
        row = result[key]
        print(f"{name:34} {row['median_ms']:10.2f} {row['p90_ms']:10.2f} {row['n']:6d}")
    row = result["api_batch_32"]
    print(f"POST /api/predict, 32 images: median {row['median_ms']:.1f} ms = {row['images_per_s']} images/s")
    single = result["api_single"]
    print(f"POST /api/predict, one image: 320x240 single cell {single['single_cell_320x240']['median_ms']:.1f} ms, "
          f"640x480 field {single['field_640x480']['median_ms']:.1f} ms ({single['field_over_single_ratio']}x); "
          f"finding the cells alone {single['find_white_cells_640x480']['median_ms']:.2f} ms")
    print(f"speed-up over naive: {result['speedup_vs_naive']:.1f}x")
    server = result.get("server")
    if server:
        print(f"\nstart-up to first 200: {server['startup_s']} s (median {server['startup_median_s']} s)")
        for key, value in server.items():
            if key.startswith("after_"):
                print(f"memory {key.replace('_', ' ')}: RSS {value['rss_mb']} MB (peak {value['peak_rss_mb']} MB)")
    print(f"\n{'target':32} {'value':>10} {'target':>10}  met")
    for name, row in result["checks"].items():
        print(f"{name:32} {row['value']:10} {row['target']:10}  {'yes' if row['met'] else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
