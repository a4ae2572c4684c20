"""Grad-CAM: where in the image the model looked for its answer (Keras on the TensorFlow backend, free of Flask).

The heatmap comes from the last block with a spatial (4-D) output: for the shipped model that is the nested
MobileNetV2 (`mobilenetv2_1.00_224`, whose last layer is `out_relu`, 7x7x1280). Gradients are taken of the
class *logit* when the model ends in a softmax Dense layer: the gradient of a probability near 1 vanishes and
would leave a blank map exactly for the most confident answers.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
from PIL import Image

from hematovision.imaging import IMAGE_SIZE

# A dark-blue -> cyan -> yellow -> red ramp: readable over pink and purple stains, and not a rainbow.
_RAMP = np.array([[20, 30, 120], [0, 170, 220], [250, 220, 40], [220, 30, 30]], dtype=np.float64)


class GradCam:
    """A model split at its last spatial block, with a traced function that returns that block's output and
    its gradient. Build it once per model; the first call traces the graph (~1 s), later ones take ~30 ms on a CPU."""

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

    def compute_heatmap(self, model_input: np.ndarray, class_index: int) -> np.ndarray:
        """(224, 224, 3) uint8 -> (h, w) float heatmap in [0, 1] at the block's resolution (7x7 for MobileNetV2)."""
        batch = np.asarray(model_input, dtype=np.float32)[None]
        with self._lock:
            features, gradients = self._run(batch, np.array([class_index], dtype=np.int32))
        features, gradients = features.numpy()[0], gradients.numpy()[0]
        weights = gradients.mean(axis=(0, 1))  # one weight per channel: its average gradient
        cam = np.maximum((features * weights).sum(axis=-1), 0.0)
        top = float(cam.max())
        return cam / top if top > 0 else cam


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
    the centre of the hottest heatmap cell (the model input is the whole image stretched to 224x224, so the
    mapping is linear on each axis). Inside the map that is where the bilinear upsampling peaks too; for a cell
    on the map's edge the upsampled map is flat from the cell's centre out to the border, and its first maximal
    pixel would be the image's border or corner, half a cell from where the value was computed."""
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


def encode_jpeg_uri(image: Image.Image, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
