"""Grad-CAM with the tiny real Keras model (no mocks): the heatmap, the overlay, the page, and the measure script."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import stream_encode_multipart

from hematovision import gradcam
from hematovision.cells import Cell, canonical_crop
from hematovision.imaging import prepare_field
from training import measure_gradcam


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


def smear(size=(320, 240), cell=(200, 120, 40), dot=(40, 40, 4)) -> Image.Image:
    """A pink background with one big purple 'cell' and one small purple 'platelet'."""
    image = Image.new("RGB", size, (225, 185, 190))
    draw = ImageDraw.Draw(image)
    for x, y, r in (cell, dot):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(110, 70, 190))
    return image


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
    assert re.search(r'<input class="view-toggle__input" type="radio" name="view" id="view-image" checked>', text)
    assert re.search(r'<label class="view-toggle__label" for="view-heatmap">', text)
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
    by_hand = np.asarray(Image.fromarray(rgb[y0:y0 + side, x0:x0 + side]).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(canonical_crop(rgb, cell, 224), by_hand)


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


# --- training/measure_gradcam.py -------------------------------------------------------------------


def test_cell_mask_is_the_largest_purple_blob_dilated():
    mask = measure_gradcam.find_cell_mask(np.asarray(smear()), margin=3)
    assert mask[120, 200] and mask[120, 200 + 40 + 2]  # inside, and in the dilated rim
    assert not mask[40, 40]  # the small 'platelet' is not the cell
    assert not mask[120, 200 + 40 + 6]
    assert measure_gradcam.find_cell_mask(np.full((50, 50, 3), 220, np.uint8)) is None


def test_measure_script_reports_a_hit_rate(tiny_model_path, tmp_path, capsys):
    for label in ("EOSINOPHIL", "NEUTROPHIL"):
        (tmp_path / "data" / label).mkdir(parents=True)
        smear().save(tmp_path / "data" / label / "a.png")
    Image.new("RGB", (64, 64), (220, 220, 220)).save(tmp_path / "data" / "NEUTROPHIL" / "blank.png")
    out = tmp_path / "report.json"
    result = measure_gradcam.main(
        ["--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_path), "--json", str(out)]
    )
    assert result["n"] == 2 and 0 <= result["hits"] <= 2
    assert result["no_cell_found"] == ["NEUTROPHIL/blank.png"]
    assert set(result["per_folder"]) == {"EOSINOPHIL", "NEUTROPHIL"}
    assert 0 < result["chance_rate"] < 0.2
    assert json.loads(out.read_text())["hits"] == result["hits"]
    assert "Grad-CAM peak on the stained cell" in capsys.readouterr().out


def make_kaggle_layout(root: Path, shift: int = 0) -> Path:
    """A miniature blood-cells/ folder: one 640x480 original with its WBC box, its TEST_SIMPLE copy (halved;
    `shift` moves the copy so that it no longer matches), the source map and a box CSV."""
    original = smear(size=(640, 480), cell=(400, 240, 80), dot=(80, 80, 8))
    (root / "dataset-master" / "JPEGImages").mkdir(parents=True)
    original.save(root / "dataset-master" / "JPEGImages" / "BloodImage_00007.jpg", quality=95)
    folder = root / "dataset2-master" / "images" / "TEST_SIMPLE" / "NEUTROPHIL"
    folder.mkdir(parents=True)
    half = original.resize((320, 240), Image.Resampling.BOX)
    if shift:
        half = half.rotate(0, translate=(shift, shift), fillcolor=(0, 0, 0))
    half.save(folder / "_0_1.jpeg", quality=95)
    (root / "test_simple_to_original.csv").write_text(
        "test_simple_file,original_image_id\nimages/TEST_SIMPLE/NEUTROPHIL/_0_1.jpeg,7\n", encoding="utf-8")
    boxes = root / "boxes.csv"
    boxes.write_text("original_id,xmin,ymin,xmax,ymax\n7,321,161,480,320\n", encoding="utf-8")
    return boxes


def test_measure_script_scores_the_annotated_box(tiny_model_path, tmp_path, capsys):
    boxes = make_kaggle_layout(tmp_path / "blood-cells")
    data = tmp_path / "blood-cells" / "dataset2-master" / "images" / "TEST_SIMPLE"
    result = measure_gradcam.main(["--data-dir", str(data), "--model", str(tiny_model_path),
                                   "--wbc-boxes", str(boxes), "--overlays", str(tmp_path / "overlays")])
    box = result["annotated_box"]  # the source map is found above --data-dir
    assert box["n"] == 1 and box["misfit_left_out"] == [] and 0 <= box["hits"] <= 1
    assert 0.08 < box["chance_rate"] < 0.09  # 160x160 of 640x480, halved on both axes: 80x80 of 320x240
    row = result["images"][0]
    assert row["source_id"] == 7 and row["misfit"] < 0.2
    x, y = row["peak"]
    assert row["hit_box"] == (160 <= x + 0.5 <= 240 and 80 <= y + 0.5 <= 160)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 1
    assert "annotated WBC box" in capsys.readouterr().out


def test_an_image_that_is_not_its_halved_original_is_left_out(tiny_model_path, tmp_path):
    boxes = make_kaggle_layout(tmp_path / "blood-cells", shift=40)
    data = tmp_path / "blood-cells" / "dataset2-master" / "images" / "TEST_SIMPLE"
    result = measure_gradcam.measure(data, tiny_model_path, margin=4, min_blue_excess=20, max_brightness=200,
                                     wbc_boxes=boxes)
    assert "annotated_box" not in result and result["images"][0]["misfit"] > 0.5


def test_wbc_boxes_are_read_from_voc_annotations(tmp_path):
    xml = ("<annotation><object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
           "</bndbox></object><object><name>WBC</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax>"
           "<ymax>40</ymax></bndbox></object></annotation>")
    (tmp_path / "BloodImage_00042.xml").write_text(xml, encoding="utf-8")
    assert measure_gradcam.read_wbc_boxes(tmp_path) == {42: [(10.0, 20.0, 30.0, 40.0)]}
    shipped = measure_gradcam.read_wbc_boxes(measure_gradcam.DEFAULT_BOXES)
    assert len(shipped) == 358 and sum(len(b) for b in shipped.values()) == 372  # 14 photos hold two white cells


def test_held_out_originals_are_the_validation_photos_halved(tiny_model_path, tmp_path):
    """--held-out-originals measures the original photos of exactly the source photos that the model's grouped
    split held out, halved like TEST_SIMPLE, with their boxes halved too."""
    import csv

    from training.fit_abstention import kaggle_split

    from training.train import DEFAULTS as TRAIN_DEFAULTS

    root = tmp_path / "blood-cells"
    train = root / "dataset2-master" / "images" / "TRAIN"
    originals = root / "dataset-master" / "JPEGImages"
    originals.mkdir(parents=True)
    chosen: dict[str, dict[int, list[str]]] = {}  # two source photos per class, two TRAIN copies of each
    with open(TRAIN_DEFAULTS["sources"], newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            photos = chosen.setdefault(row["label"], {})
            source = int(row["source_id"])
            if (source in photos or len(photos) < 2) and len(photos.get(source, [])) < 2:
                photos.setdefault(source, []).append(row["path"])
    boxes = ["original_id,xmin,ymin,xmax,ymax"]
    for photos in chosen.values():
        for source, paths in photos.items():
            for path in paths:
                (train / path).parent.mkdir(parents=True, exist_ok=True)
                smear(size=(320, 240)).save(train / path)
            smear(size=(640, 480), cell=(400, 240, 80)).save(originals / f"BloodImage_{source:05d}.jpg", quality=95)
            boxes.append(f"{source},321,161,480,320")
    (root / "boxes.csv").write_text("\n".join(boxes) + "\n", encoding="utf-8")

    result = measure_gradcam.main(["--data-dir", str(train), "--kaggle-dir", str(root), "--held-out-originals",
                                   "--model", str(tiny_model_path), "--wbc-boxes", str(root / "boxes.csv"),
                                   "--shifts", "2"])
    labels = json.loads(tiny_model_path.with_suffix(".json").read_text())["labels"]
    _, validation = kaggle_split(train, labels, TRAIN_DEFAULTS["sources"], 0.15, 1337)
    validation_files = {Path(v).resolve() for v in validation.paths}
    held_out = {source for photos in chosen.values() for source, paths in photos.items()
                if any((train / p).resolve() in validation_files for p in paths)}
    assert result["shifts"] == 2 and result["method"] == gradcam.DEFAULT_METHOD
    assert result["images_measured"].startswith("held-out")
    assert {row["source_id"] for row in result["images"]} == held_out and len(held_out) == 4  # one per class
    assert result["annotated_box"]["n"] == 4 and result["annotated_box"]["misfit_left_out"] == []
    for row in result["images"]:
        x, y = row["peak"]
        assert 0 <= x < 320 and 0 <= y < 240  # the halved photo
        assert row["hit_box"] == (160 <= x + 0.5 <= 240 and 80 <= y + 0.5 <= 160)  # the box, halved

    # --trained-on-originals: the other source photos, each setting of several under "method, kxk"
    result = measure_gradcam.main(["--data-dir", str(train), "--kaggle-dir", str(root), "--trained-on-originals",
                                   "--model", str(tiny_model_path), "--wbc-boxes", str(root / "boxes.csv"),
                                   "--shifts", "1", "--method", "gradcam", "gradcam++"])
    assert set(result["by_setting"]) == {"gradcam, 1x1", "gradcam++, 1x1"}
    for name, setting in result["by_setting"].items():
        assert setting["method"] == name.split(",")[0] and setting["images_measured"].startswith("trained-on")
        trained_on = {source for photos in chosen.values() for source in photos} - held_out
        assert {row["source_id"] for row in setting["images"]} == trained_on and len(trained_on) == 4

