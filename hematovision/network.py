"""MobileNetV2 transfer-learning network. Backend-agnostic Keras 3 (TensorFlow on CPU, PyTorch or JAX on GPU)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from hematovision.imaging import IMAGE_SIZE

BASE_NAME = "mobilenetv2_1.00_224"


def build_model(num_classes: int, weights: str | None = "imagenet", dropout: float = 0.2) -> keras.Model:
    """uint8-range RGB 224x224 in, softmax over `num_classes` out. All scaling lives inside the model."""
    inputs = keras.Input(shape=(*IMAGE_SIZE, 3), name="image")
    # MobileNetV2 expects [-1, 1]; a Rescaling layer (not preprocess_input) survives an .h5 round trip.
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_unit_range")(inputs)
    base = keras.applications.MobileNetV2(
        include_top=False, alpha=1.0, input_shape=(*IMAGE_SIZE, 3), weights=weights, name=BASE_NAME
    )
    # training=False keeps batch norm in inference mode even once the base is unfrozen (Keras guide).
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    # float32 output so softmax stays exact under a mixed-precision policy on the GPU.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="hematovision_mobilenetv2")


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def set_trainable_from(model: keras.Model, first_layer: str | None) -> int:
    """Freeze the base below `first_layer` (a layer name of MobileNetV2, e.g. 'block_13_expand');
    None freezes the whole base, '' unfreezes it all. Returns the number of trainable base layers."""
    base = base_of(model)
    if first_layer is None:
        base.trainable = False
        return 0
    base.trainable = True
    names = [layer.name for layer in base.layers]
    start = 0 if first_layer == "" else names.index(first_layer)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start
    return len(base.layers) - start


AUGMENTATIONS = ("geometric", "stain")


class RandomPlacement(layers.Layer):
    """One random affine resampling per image: mirror, any rotation, scale and shift, black fill (as the
    dataset's own rotation borders). One interpolation instead of Keras' three chained layers; on the PyTorch
    backend it runs as one batched grid_sample (Keras' torch affine_transform loops over images in Python,
    which made training steps 10x slower on a GPU)."""

    def __init__(self, zoom: float = 0.15, shift: float = 0.1, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.zoom, self.shift, self.seed = zoom, shift, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        n = ops.shape(images)[0]
        h, w = images.shape[1], images.shape[2]

        def uniform(low, high):
            return keras.random.uniform((n,), low, high, seed=self.seed_generator, dtype=self.compute_dtype)

        angle = uniform(-np.pi, np.pi)
        scale = uniform(1.0 - self.zoom, 1.0 + self.zoom)  # > 1 shows a wider field: the cell looks smaller
        flip = ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        tx, ty = uniform(-self.shift, self.shift) * (w - 1), uniform(-self.shift, self.shift) * (h - 1)
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
        # Output pixel p (centred) samples the input at A p + t, with A = scale * rotation * mirror.
        a00, a01, a10, a11 = cos * flip, -sin, sin * flip, cos
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        if keras.backend.backend() == "torch":
            import torch

            theta = torch.stack([torch.stack([a00, a01 * cy / cx, tx / cx], -1),
                                 torch.stack([a10 * cx / cy, a11, ty / cy], -1)], 1)
            grid = torch.nn.functional.affine_grid(theta, (n, 3, h, w), align_corners=True)
            out = torch.nn.functional.grid_sample(images.permute(0, 3, 1, 2), grid, mode="bilinear",
                                                  padding_mode="zeros", align_corners=True)
            return out.permute(0, 2, 3, 1)
        zeros = ops.zeros_like(angle)
        transform = ops.stack([a00, a01, cx + tx - a00 * cx - a01 * cy,
                               a10, a11, cy + ty - a10 * cx - a11 * cy, zeros, zeros], axis=-1)
        return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="constant",
                                          fill_value=0.0, data_format="channels_last")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "zoom": self.zoom, "shift": self.shift, "seed": self.seed}


class RandomStainJitter(layers.Layer):
    """Stain-colour jitter in optical-density space (Tellez et al. 2018, 'HED jitter'): each image's stain
    amounts are scaled and shifted at random. A second lab's stain, scanner and white balance move colours
    in just this way, so the network learns to not rely on one lab's exact hue."""

    # Ruifrok & Johnston's haematoxylin / eosin / DAB optical densities; blood films use Romanowsky stains
    # (eosin + a methylene-blue/azure mix), close enough for a jitter direction.
    RGB_FROM_HED = [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]

    def __init__(self, strength: float = 0.1, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength = strength
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        rgb_from_hed = np.asarray(self.RGB_FROM_HED, np.float64)
        rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
        self._rgb_from_hed = rgb_from_hed.astype(np.float32)
        self._hed_from_rgb = np.linalg.inv(rgb_from_hed).astype(np.float32)

    def call(self, images, training=True):
        if not training or not self.strength:
            return images
        ops = keras.ops
        shape = (ops.shape(images)[0], 1, 1, 3)
        s = self.strength
        scale = keras.random.uniform(shape, 1.0 - s, 1.0 + s, seed=self.seed_generator, dtype=self.compute_dtype)
        shift = keras.random.uniform(shape, -s, s, seed=self.seed_generator, dtype=self.compute_dtype)
        density = -ops.log((images + 1.0) / 256.0)
        stains = ops.matmul(density, ops.convert_to_tensor(self._hed_from_rgb, self.compute_dtype))
        density = ops.matmul(stains * scale + shift, ops.convert_to_tensor(self._rgb_from_hed, self.compute_dtype))
        return ops.clip(256.0 * ops.exp(-density) - 1.0, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}


class RandomLighting(layers.Layer):
    """Per-image brightness, contrast and saturation jitter (illumination and camera differences), vectorised
    with keras.ops: Keras' RandomColorJitter took seconds per batch on the PyTorch backend."""

    def __init__(self, brightness: float = 0.15, contrast: float = 0.2, saturation: float = 0.2,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.brightness, self.contrast, self.saturation, self.seed = brightness, contrast, saturation, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        shape = (ops.shape(images)[0], 1, 1, 1)

        def factor(spread):
            return keras.random.uniform(shape, 1.0 - spread, 1.0 + spread, seed=self.seed_generator,
                                        dtype=self.compute_dtype)

        grey = ops.mean(images, axis=-1, keepdims=True)
        images = grey + (images - grey) * factor(self.saturation)
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        images = mean + (images - mean) * factor(self.contrast)
        return ops.clip(images * factor(self.brightness), 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast,
                "saturation": self.saturation, "seed": self.seed}


def build_augmenter(seed: int, recipe: str = "geometric") -> keras.Sequential:
    """Training-time augmentation on 0-255 float images, float32 whatever the global dtype policy.

    "geometric" (the first shipped recipe): rotation, both flips, zoom, shift; black fill, as the dataset's own
    rotation borders. "stain" adds what differs between labs: a wider scale range (PBC's cells fill the frame,
    Kaggle's a quarter of it), stain jitter, brightness/contrast/saturation, and a mild blur (focus)."""
    if recipe not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {recipe!r}")
    f32 = {"dtype": "float32"}
    steps = [RandomPlacement(zoom=0.15 if recipe == "geometric" else 0.35, shift=0.1, seed=seed, **f32)]
    if recipe == "stain":
        steps += [
            RandomStainJitter(0.1, seed=seed + 4, **f32),
            RandomLighting(brightness=0.15, contrast=0.2, saturation=0.2, seed=seed + 5, **f32),
            layers.RandomGaussianBlur(factor=(0.0, 1.0), kernel_size=5, sigma=(0.1, 1.2), value_range=(0, 255),
                                      seed=seed + 6, **f32),
        ]
    return keras.Sequential(steps, name="augment")
