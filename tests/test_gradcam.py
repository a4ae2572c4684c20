"""Grad-CAM with the tiny real Keras model (no mocks): the heatmap, the overlay, the page, and the measure script."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from hematovision import gradcam
from hematovision.cells import Cell, background_colour, canonical_crop, white_balance
from hematovision.imaging import prepare_field


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    import keras

    return keras.models.load_model(tiny_model_path, compile=False)


def post_files(client, files, explain=True):
    fields = MultiDict([("file", FileStorage(io.BytesIO(data), name)) for name, data in files])
    if explain:
        fields.add("explain", "on")
    body, _length, boundary = stream_encode_multipart(fields, use_tempfile=False)
    return client.post("/predict", data=body.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")


def test_heatmap_has_the_last_spatial_layers_shape_and_lies_in_0_1(tiny_model, make_image):
    explainer = gradcam.GradCam(tiny_model)
    assert explainer.layer.name.startswith("conv2d")
    for class_index in range(4):
        heatmap = explainer.compute_heatmap(prepare_field(make_image()).primary_crop, class_index)
        assert heatmap.shape == (55, 55)  # 7x7 convolution, stride 4, on 224 pixels
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        assert heatmap.max() in (0.0, 1.0)  # normalised by its peak (or all zero)


def test_a_nested_base_model_is_explained_at_its_output():
    """The shipped model's shape: the convolutional base is a nested Functional model, then pooling + softmax."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    base_in = keras.Input((224, 224, 3))
    base_out = layers.Conv2D(4, 3, strides=32, padding="same", activation="relu", name="out_relu")(base_in)
    base = keras.Model(base_in, base_out, name="base")
    inputs = keras.Input((224, 224, 3))
    x = layers.GlobalAveragePooling2D()(base(layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, layers.Dense(4, activation="softmax")(x))

    explainer = gradcam.GradCam(model)
    assert explainer.layer.name == "base"
    heatmap = explainer.compute_heatmap(np.full((224, 224, 3), 128, np.uint8), 2)
    assert heatmap.shape == (7, 7) and 0.0 <= heatmap.min() <= heatmap.max() <= 1.0


def pooling_dense_model(seed: int, image_seed: int):
    """A conv layer (7x7x6 maps), global pooling and a softmax Dense layer; a random image; the maps and the
    Dense kernel read straight from the model, for the closed forms below."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((224, 224, 3))
    features = layers.Conv2D(6, 9, strides=32, padding="same", activation="relu", name="features")(inputs)
    dense = layers.Dense(4, activation="softmax")
    model = keras.Model(inputs, dense(layers.GlobalAveragePooling2D()(features)))
    image = np.random.default_rng(image_seed).integers(0, 256, (224, 224, 3)).astype(np.uint8)
    maps = keras.Model(inputs, features).predict_on_batch(image[None].astype(np.float32))[0].astype(np.float64)
    kernel = keras.ops.convert_to_numpy(dense.kernel).astype(np.float64)
    return model, image, maps, kernel


def scaled_to_peak_one(cam: np.ndarray) -> np.ndarray:
    return cam / cam.max() if cam.max() > 0 else cam


def test_heatmap_is_the_class_activation_map_of_the_logit():
    """For pooling + softmax Dense, Grad-CAM of the logit is exactly CAM: ReLU(sum_k w_kc A_k), scaled to peak 1.
    This checks the gradient (of the pre-softmax score), the channel weights (spatial mean) and the ReLU."""
    model, image, maps, kernel = pooling_dense_model(seed=3, image_seed=0)
    explainer = gradcam.GradCam(model)
    for class_index in range(4):
        expected = scaled_to_peak_one(np.maximum(maps @ kernel[:, class_index], 0))
        np.testing.assert_allclose(explainer.compute_heatmap(image, class_index), expected, atol=1e-5)


def test_gradcam_plus_plus_follows_its_closed_form_behind_pooling_and_dense():
    """Behind global pooling and a softmax Dense layer the logit's gradient is w_kc / (h*w) at every position, so
    Grad-CAM++'s alpha is 1 / (2 + S_k g_k) with S_k the channel's summed activation, and its channel weight is
    h*w*relu(g_k)*alpha: only channels with a positive weight for the class count. This checks the formula, the
    positive part and the ReLU against the features read straight from the model."""
    model, image, maps, kernel = pooling_dense_model(seed=5, image_seed=1)
    explainer = gradcam.GradCam(model)
    positions = maps.shape[0] * maps.shape[1]
    differs = False
    for class_index in range(4):
        g = kernel[:, class_index] / positions
        weights = positions * np.maximum(g, 0) / (2 + maps.sum(axis=(0, 1)) * g)
        expected = scaled_to_peak_one(np.maximum(maps @ weights, 0))
        heatmap = explainer.compute_heatmap(image, class_index, method="gradcam++")
        np.testing.assert_allclose(heatmap, expected, atol=1e-4)
        differs |= not np.allclose(heatmap, explainer.compute_heatmap(image, class_index), atol=1e-3)
    assert differs  # a different map from Grad-CAM's, not the same one by another name


def test_an_unknown_method_is_refused(tiny_model):
    with pytest.raises(ValueError, match="method must be one of"):
        gradcam.GradCam(tiny_model).compute_heatmap(np.zeros((224, 224, 3), np.uint8), 0, method="magic")


def test_the_app_refuses_an_unknown_gradcam_method_at_start(tiny_model_path):
    from app import create_app

    with pytest.raises(ValueError, match="GRADCAM_METHOD"):
        create_app({"TESTING": True, "MODEL_PATH": str(tiny_model_path), "GRADCAM_METHOD": "gradcam+"})


def test_shifted_copies_move_content_and_come_back():
    image = np.arange(224 * 224 * 3, dtype=np.float32).reshape(224, 224, 3)
    offsets = gradcam.shift_offsets(4, 32)
    assert offsets[0] == (0, 0) and len(offsets) == 16 and sorted({dx for dx, _ in offsets}) == [-8, 0, 8, 16]
    shifted = gradcam.shift_images(image, offsets)
    for copy, (dx, dy) in zip(shifted, offsets, strict=True):
        np.testing.assert_array_equal(copy[20 + dy, 30 + dx], image[20, 30])  # content moved by (dx, dy)
    # Maps drawn in each copy's own frame (a spot where the copy shows the original's pixel (100, 60)) come
    # back to the original's frame.
    cams = np.zeros((len(offsets), 224, 224))
    for cam, (dx, dy) in zip(cams, offsets, strict=True):
        cam[60 + dy, 100 + dx] = 1.0
    average = gradcam.unshift_average(cams, offsets, (224, 224))
    assert np.unravel_index(int(np.argmax(average)), average.shape) == (60, 100)


def test_shifted_heatmap_finds_a_spot_finer_than_one_cell():
    """A model whose class score is the brightness summed per 32x32 cell: the coarse map can only name the cell
    around a bright spot; the shift-averaged map puts its peak on the spot itself."""
    import keras
    from keras import layers

    inputs = keras.Input((224, 224, 3))
    features = layers.Conv2D(1, 32, strides=32, use_bias=False, kernel_initializer="ones", name="cells")(inputs)
    head = layers.Dense(4, activation="softmax", kernel_initializer="ones")
    model = keras.Model(inputs, head(layers.GlobalAveragePooling2D()(features)))
    image = np.zeros((224, 224, 3), np.uint8)
    image[52:68, 92:108] = 255  # a 16-pixel spot centred on (100, 60): cell (1, 2) spans x 64-96, y 32-64
    explainer = gradcam.GradCam(model)
    coarse = explainer.compute_heatmap(image, 0)
    fine = explainer.compute_heatmap(image, 0, shifts=4)
    assert coarse.shape == (7, 7) and fine.shape == (224, 224) and fine.max() == 1.0
    cx, cy = gradcam.find_peak(coarse, (224, 224))
    fx, fy = gradcam.find_peak(fine, (224, 224))
    assert np.hypot(fx - 100, fy - 60) <= 8 < np.hypot(cx - 100, cy - 60)


def test_peak_is_the_centre_of_the_hottest_cell_also_on_the_edge():
    heatmap = np.zeros((7, 7))
    heatmap[3, 4] = 1.0
    assert gradcam.find_peak(heatmap, (320, 240)) == (205, 120)
    heatmap[0, 0] = 2.0  # a corner cell: its centre, not the image's corner pixel
    assert gradcam.find_peak(heatmap, (320, 240)) == (22, 17)


def test_a_model_without_spatial_layers_is_refused():
    import keras

    inputs = keras.Input((224, 224, 3))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="spatial"):
        gradcam.find_target_layer(model)


def test_peak_and_overlay_follow_the_image_size():
    heatmap = np.zeros((7, 7))
    heatmap[6, 0] = 1.0  # bottom-left corner
    x, y = gradcam.find_peak(heatmap, (320, 240))
    assert x < 320 / 7 and y > 240 * 6 / 7
    image = Image.new("RGB", (320, 240), (200, 180, 190))
    overlay = gradcam.overlay_heatmap(image, heatmap)
    assert overlay.size == (320, 240) and overlay.mode == "RGB"
    hot, cold = np.asarray(overlay)[235, 5], np.asarray(overlay)[5, 315]
    assert abs(int(hot[0]) - int(hot[2])) > abs(int(cold[0]) - int(cold[2]))  # red over the peak only
    assert gradcam.encode_jpeg_uri(overlay).startswith("data:image/jpeg;base64,")


def test_result_page_offers_the_heatmap_with_a_scriptless_toggle(client, make_image):
    text = html.unescape(post_files(client, [("cell.png", make_image())]).get_data(as_text=True))
    # The heatmap was asked for: the page opens on it; the plain image is one click away.
    assert re.search(r'<input class="view-toggle__input" type="radio" name="view" id="view-heatmap" checked>', text)
    assert re.search(r'<label class="view-toggle__label" for="view-image">', text)
    heatmap = re.search(r'<img class="result__image result__image--heatmap" src="data:image/jpeg;base64,([^"]+)"', text)
    assert heatmap
    original = re.search(r'<img class="result__image" src="data:image/jpeg;base64,([^"]+)"', text)
    sizes = [Image.open(io.BytesIO(base64.b64decode(m.group(1)))).size for m in (original, heatmap)]
    assert sizes[0] == sizes[1]


def test_heatmap_is_opt_in_so_the_plain_prediction_stays_fast(client, make_image):
    text = post_files(client, [("cell.png", make_image())], explain=False).get_data(as_text=True)
    assert "Predicted Class:" in text and "result__image--heatmap" not in text
    assert "hematovision.gradcam" not in client.application.extensions


def test_batch_page_and_api_do_not_compute_heatmaps(client, make_image):
    files = [("a.png", make_image()), ("b.png", make_image(size=(50, 70)))]
    assert "result__image--heatmap" not in post_files(client, files).get_data(as_text=True)
    assert "hematovision.gradcam" not in client.application.extensions


# --- each cell's heatmap, drawn back onto the field -----------------------------------------------------

FIELDS = Path(__file__).resolve().parent / "data" / "fields"
TWO_CELLS = (FIELDS / "bccd_00010_two_wbc.jpg").read_bytes()


def test_crop_window_is_where_the_canonical_crop_comes_from():
    rgb = np.asarray(Image.open(io.BytesIO(TWO_CELLS)).convert("RGB"))
    cell = Cell((140, 80, 180, 130), 100, 1.0)  # a box whose 2x window (100 px) stays inside the 320x240 field
    x0, y0, side = gradcam.crop_window(cell.box)
    assert (x0, y0, side) == (110, 55, 100)
    by_hand = Image.fromarray(rgb[y0:y0 + side, x0:x0 + side]).resize((224, 224), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(canonical_crop(rgb, cell, 224), white_balance(by_hand, background_colour(rgb)))


def test_cell_heatmaps_are_drawn_in_their_windows_and_nowhere_else():
    image = Image.new("RGB", (160, 120), (200, 180, 190))
    heatmap = np.zeros((7, 7))
    heatmap[0, 6] = 1.0  # hot in the crop's top-right corner
    # A 20x20 cell at (40, 40) in a field twice this size: its 40 px window starts at (30, 30), here (15, 15), 20 px.
    overlay = np.asarray(gradcam.overlay_cell_heatmaps(image, 0.5, [((40, 40, 60, 60), heatmap)]))
    original = np.asarray(image)
    np.testing.assert_array_equal(overlay[:15], original[:15])  # outside the window: untouched
    np.testing.assert_array_equal(overlay[:, 35:], original[:, 35:])
    assert (overlay[15:35, 15:35] != original[15:35, 15:35]).any(axis=-1).all()  # the whole window is tinted
    hot, cold = overlay[16, 33].astype(int), overlay[33, 16].astype(int)
    assert hot[0] - hot[2] > cold[0] - cold[2]  # red where the crop's heatmap is hot, blue where cold
    # A window reaching past the field's edge is clipped, not an error.
    clipped = gradcam.overlay_cell_heatmaps(image, 1.0, [((150, 110, 170, 130), heatmap)])
    assert clipped.size == image.size


def test_a_field_gets_a_heatmap_around_each_cell(client):
    text = html.unescape(post_files(client, [("field.jpg", TWO_CELLS)]).get_data(as_text=True))
    heatmap = re.search(r'<img class="result__image result__image--heatmap" src="data:image/jpeg;base64,([^"]+)"', text)
    original = re.search(r'<img class="result__image" src="data:image/jpeg;base64,([^"]+)"', text)
    shown, plain = (np.asarray(Image.open(io.BytesIO(base64.b64decode(m.group(1)))), dtype=int)
                    for m in (heatmap, original))
    assert shown.shape == plain.shape == (240, 320, 3)
    windows = np.zeros(plain.shape[:2], bool)
    for cell in prepare_field(TWO_CELLS).cells:
        x0, y0, side = gradcam.crop_window(cell.box)
        windows[max(0, y0):y0 + side, max(0, x0):x0 + side] = True
    difference = np.abs(shown - plain).sum(axis=-1)
    assert difference[windows].mean() > 20  # tinted where the model looked
    assert difference[~windows].mean() < 3  # elsewhere the same picture (JPEG noise only)
    assert "Shown for cell" not in text  # both cells explained


def test_the_heatmap_explains_at_most_a_few_cells_and_says_which(client, monkeypatch):
    from hematovision import web

    monkeypatch.setattr(web, "HEATMAP_MAX_CELLS", 1)
    text = " ".join(html.unescape(post_files(client, [("field.jpg", TWO_CELLS)]).get_data(as_text=True)).split())
    prepared = prepare_field(TWO_CELLS)
    left_first = sorted(range(2), key=lambda i: prepared.cells[i].centre[0])
    number = left_first.index(prepared.primary) + 1  # the primary cell, nearest the centre
    assert f"Shown for cell {number}, the 1 nearest the centre." in text
