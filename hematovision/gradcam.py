"""Grad-CAM: where in the image the model looked for its answer (Keras on the TensorFlow backend, free of Flask).

The heatmap comes from the last block with a spatial (4-D) output: for the shipped model that is the nested
MobileNetV2 (`mobilenetv2_1.00_224`, whose last layer is `out_relu`, 7x7x1280). Gradients are taken of the
class *logit* when the model ends in a softmax Dense layer: the gradient of a probability near 1 vanishes and
would leave a blank map exactly for the most confident answers.

The model sees one white cell at a time, on its canonical crop (hematovision.cells), so the heatmap is computed on
that crop and drawn back onto the field where the crop came from (crop_window, overlay_cell_heatmaps).

That block is coarse: one heatmap cell is 32x32 input pixels, and a white cell fills about half of the crop's side.
`compute_heatmap(..., shifts=k)` refines it by translation averaging: the input is shifted by k x k sub-cell offsets
(edge pixels repeated), each map is stretched to the input's 224x224 pixels and shifted back, and the maps are
averaged. Each shifted copy samples the image on a grid offset by a fraction of a cell, so the average has detail
finer than one cell, at k*k times the cost (one batched pass).

Two ways to weight the block's channels (`method`):
- "gradcam" (Selvaraju et al., 2017): each channel by its mean gradient. Behind pooling and one Dense layer the
  gradient is the same at every position, so this is exactly the class activation map, negative evidence included.
- "gradcam++" (Chattopadhay et al., 2018): each channel by its positive gradients, each position weighted by
  alpha = g^2 / (2 g^2 + sum(A) g^3). Behind pooling + Dense that keeps only the channels that speak for the class
  and scales each by about 1 / its total activation, so one strongly active channel cannot drown the others.
The app uses Grad-CAM++: chosen on the boxed photos the model did not train on (see DEFAULT_METHOD).
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
from PIL import Image

from hematovision.cells import crop_window
from hematovision.imaging import IMAGE_SIZE

# Shifted copies per axis for the app's heatmap, and how the channels are weighted (module doc). Both were chosen
# for the earlier whole-frame model, on boxed validation photos (a measuring script since removed with that model;
# see the git history): shifts and Grad-CAM++ put the heatmap's peak in the white cell's box more often. They have
# not been measured again on cell crops.
DEFAULT_SHIFTS = 4
METHODS = ("gradcam", "gradcam++")
DEFAULT_METHOD = "gradcam++"

# A dark-blue -> cyan -> yellow -> red ramp: readable over pink and purple stains, and not a rainbow.
_RAMP = np.array([[20, 30, 120], [0, 170, 220], [250, 220, 40], [220, 30, 30]], dtype=np.float64)


class GradCam:
    """A model split at its last spatial block, with a traced function that returns that block's output and
    its gradient. Build it once per model: the first call traces the graph, which costs far more than later calls."""

    def __init__(self, model):
        import keras

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("Grad-CAM here needs the TensorFlow backend of Keras.")
        import tensorflow as tf

        self.layer = find_target_layer(model)
        head = model.layers[-1]
        self._kernel = None
        if isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax:
            # Read the logits from the Dense layer's input and its own weights.
            outputs = [_output_of(self.layer), head.input]
            self._kernel, self._bias = head.kernel, head.bias
        else:
            outputs = [_output_of(self.layer), model.outputs[0]]
        self._split = keras.Model(model.inputs, outputs)
        self._lock = threading.Lock()

        @tf.function(
            input_signature=[tf.TensorSpec([None, *IMAGE_SIZE, 3], tf.float32), tf.TensorSpec([None], tf.int32)],
            reduce_retracing=True,
        )
        def features_and_gradients(x, class_index):
            with tf.GradientTape() as tape:
                tape.watch(x)  # records every op from the input on, even in layers whose weights are frozen
                features, last = self._split(x, training=False)
                scores = last if self._kernel is None else tf.matmul(last, self._kernel) + self._bias
                chosen = tf.gather(scores, class_index, axis=1, batch_dims=1)
            return features, tape.gradient(chosen, features)

        self._run = features_and_gradients

    def compute_heatmap(
        self, model_input: np.ndarray, class_index: int, shifts: int = 1, method: str = "gradcam"
    ) -> np.ndarray:
        """(224, 224, 3) uint8 -> float heatmap in [0, 1]: with shifts=1 at the block's resolution (7x7 for
        MobileNetV2); with shifts=k > 1 at the input's 224x224, averaged over k x k shifted copies; channels
        weighted by `method` (module doc)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        image = np.asarray(model_input, dtype=np.float32)
        offsets = shift_offsets(shifts, image.shape[0] // self.grid[0])
        batch = shift_images(image, offsets)
        with self._lock:
            features, gradients = self._run(batch, np.full(len(batch), class_index, dtype=np.int32))
        features, gradients = features.numpy(), gradients.numpy()
        cams = np.maximum((features * weigh_channels(features, gradients, method)).sum(axis=-1), 0.0)
        cam = cams[0] if shifts == 1 else unshift_average(cams, offsets, image.shape[:2])
        top = float(cam.max())
        return cam / top if top > 0 else cam

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the explained block's output, e.g. (7, 7)."""
        return tuple(int(n) for n in self._split.outputs[0].shape[1:3])


def weigh_channels(features: np.ndarray, gradients: np.ndarray, method: str) -> np.ndarray:
    """(n, h, w, c) activations and gradients -> (n, 1, 1, c) channel weights of Grad-CAM or Grad-CAM++."""
    if method == "gradcam":
        return gradients.mean(axis=(1, 2), keepdims=True)
    squared = gradients.astype(np.float64) ** 2
    denominator = 2 * squared + features.sum(axis=(1, 2), keepdims=True) * squared * gradients
    alpha = squared / np.where(denominator != 0, denominator, 1.0)
    return (alpha * np.maximum(gradients, 0)).sum(axis=(1, 2), keepdims=True)


def shift_offsets(shifts: int, cell: int) -> list[tuple[int, int]]:
    """(dx, dy) pixel offsets: a k x k grid spread evenly over one heatmap cell of `cell` pixels, around 0
    (for k = 4 and 32-pixel cells: -8, 0, 8, 16 on each axis). The unshifted image comes first."""
    if shifts < 1:
        raise ValueError("shifts must be at least 1")
    steps = [round((i - (shifts - 1) // 2) * cell / shifts) for i in range(shifts)]
    offsets = [(dx, dy) for dy in steps for dx in steps]
    return sorted(offsets, key=lambda o: (o != (0, 0), abs(o[0]) + abs(o[1])))


def shift_images(image: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """(H, W, C) -> (len(offsets), H, W, C): the image moved by each (dx, dy), the border pixels repeated into
    the gap (a black gap would be an edge the model could look at)."""
    height, width = image.shape[:2]
    pad = max(max(abs(dx), abs(dy)) for dx, dy in offsets)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return np.stack([padded[pad - dy:pad - dy + height, pad - dx:pad - dx + width] for dx, dy in offsets])


def unshift_average(cams: np.ndarray, offsets: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """Stretch each (h, w) map to `shape` = (height, width), move it back by its offset and average; each pixel
    is averaged over the maps that cover it."""
    height, width = shape
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for cam, (dx, dy) in zip(cams, offsets, strict=True):
        full = np.asarray(Image.fromarray(np.asarray(cam, np.float32), mode="F").resize(
            (width, height), Image.Resampling.BILINEAR), dtype=np.float64)
        # The shifted image's pixel (x, y) shows the original's (x - dx, y - dy).
        ys, xs = slice(max(0, dy), min(height, height + dy)), slice(max(0, dx), min(width, width + dx))
        yo, xo = slice(max(0, -dy), min(height, height - dy)), slice(max(0, -dx), min(width, width - dx))
        total[yo, xo] += full[ys, xs]
        count[yo, xo] += 1
    return np.maximum(total / np.maximum(count, 1), 0.0)


def find_target_layer(model):
    """The last top-level layer with a 4-D (batch, height, width, channels) output. A nested base model counts
    as one layer, so for the shipped model this is MobileNetV2 itself, i.e. its `out_relu`."""
    for layer in reversed(model.layers):
        shape = getattr(_output_of(layer), "shape", None)
        if shape is not None and len(shape) == 4 and layer is not model.layers[0]:
            return layer
    raise ValueError("The model has no layer with a spatial (4-D) output to explain.")


def _output_of(layer):
    # A nested Functional model's `.output` is the tensor of its own inner graph, not connected to the outer
    # model's input; the node where the outer model calls it has the right one.
    nodes = getattr(layer, "_inbound_nodes", None)
    if nodes:
        return nodes[-1].output_tensors[0]
    return layer.output


def upsample_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Heatmap -> (height, width) float array at `size` = (width, height), bilinear, values still in [0, 1]."""
    image = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.clip(np.asarray(image.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)


def find_peak(heatmap: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) of the hottest point once the heatmap is stretched over an image of `size` = (width, height):
    the centre of the hottest heatmap cell (the heatmap is stretched over the image linearly on each axis). Inside
    the map that is where the bilinear upsampling peaks too; for a cell on the map's edge the upsampled map is flat
    from the cell's centre out to the border, and its first maximal pixel would be the image's border or corner,
    half a cell from where the value was computed."""
    rows, cols = np.shape(heatmap)
    i, j = np.unravel_index(int(np.argmax(heatmap)), (rows, cols))
    x = min(int((j + 0.5) * size[0] / cols), size[0] - 1)
    y = min(int((i + 0.5) * size[1] / rows), size[1] - 1)
    return x, y


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """[0, 1] heatmap -> (h, w, 3) uint8 colours along _RAMP."""
    position = np.clip(heatmap, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).round().astype(np.uint8)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, strength: float = 0.55) -> Image.Image:
    """The image with the heatmap laid over it; cold areas stay close to the original so the cell stays readable."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    full = upsample_heatmap(heatmap, image.size)
    alpha = (strength * (0.25 + 0.75 * full))[..., None]
    blended = rgb * (1 - alpha) + colorize(full).astype(np.float64) * alpha
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), mode="RGB")


def overlay_cell_heatmaps(
    image: Image.Image, scale: float, cells: list[tuple[tuple[int, int, int, int], np.ndarray]], strength: float = 0.55
) -> Image.Image:
    """The field with each cell's heatmap drawn back where its crop came from. `cells`: (box in the original image's
    pixels, heatmap over that cell's crop); `image` is the field shown at `scale` x the original's size. Each heatmap
    covers its cell's crop window (where neighbouring windows overlap, the hotter value shows); the rest of the field,
    which the model did not look at for any cell, is left as it is."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = rgb.shape[:2]
    heat = np.zeros((height, width), np.float64)
    covered = np.zeros((height, width), bool)
    for box, heatmap in cells:
        x0, y0, side = (value * scale for value in crop_window(box))
        left, top, size = round(x0), round(y0), max(1, round(side))
        full = upsample_heatmap(heatmap, (size, size))
        ys, xs = slice(max(0, top), min(height, top + size)), slice(max(0, left), min(width, left + size))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        part = full[ys.start - top : ys.stop - top, xs.start - left : xs.stop - left]
        heat[ys, xs] = np.maximum(heat[ys, xs], part)
        covered[ys, xs] = True
    alpha = np.where(covered, strength * (0.25 + 0.75 * heat), 0.0)[..., None]
    blended = rgb * (1 - alpha) + colorize(heat).astype(np.float64) * alpha
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), mode="RGB")


def encode_jpeg_uri(image: Image.Image, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
