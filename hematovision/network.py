"""MobileNetV2 transfer-learning network. Backend-agnostic Keras 3 (TensorFlow on CPU, PyTorch or JAX on GPU)."""

from __future__ import annotations

import keras
from keras import layers, ops

from hematovision.imaging import IMAGE_SIZE

BASE_NAME = "mobilenetv2_1.00_224"


@keras.saving.register_keras_serializable(package="hematovision")
class ColourStandardisation(layers.Layer):
    """Each image moved to mean 0 and standard deviation `spread`, each image on its own: a lab's stain strength,
    brightness and contrast are gone before the network sees the cell, as a lamp's colour cast is gone after
    white_balance. `per_channel` standardises red, green and blue each on its own (the balance between the stains
    goes too); otherwise one mean and spread over all three (brightness and contrast only, colours keep their
    relations). No weights; registered, so an .h5 holding it loads wherever this module is imported."""

    def __init__(self, spread: float = 0.5, epsilon: float = 1e-3, per_channel: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.spread, self.epsilon, self.per_channel = spread, epsilon, per_channel

    def call(self, x):
        axes = (1, 2) if self.per_channel else (1, 2, 3)
        variance = ops.var(x, axis=axes, keepdims=True)
        return (x - ops.mean(x, axis=axes, keepdims=True)) * (self.spread * ops.rsqrt(variance + self.epsilon))

    def get_config(self) -> dict:
        return {**super().get_config(), "spread": self.spread, "epsilon": self.epsilon, "per_channel": self.per_channel}


STANDARDISE = ("off", "colour", "contrast")  # build_model's choices: none, ColourStandardisation per channel, or not


def build_model(num_classes: int, weights: str | None = "imagenet", dropout: float = 0.2,
                image_size: tuple[int, int] = IMAGE_SIZE, standardise: str = "off") -> keras.Model:
    """uint8-range RGB in (224x224 unless `image_size` says otherwise: training may start at a lower size; the
    weights do not depend on it), softmax over `num_classes` out. All scaling lives inside the model, and with
    `standardise` "colour" or "contrast" each image's standardisation too (ColourStandardisation per channel or
    not)."""
    inputs = keras.Input(shape=(*image_size, 3), name="image")
    # MobileNetV2 expects [-1, 1]; a Rescaling layer (not preprocess_input) survives an .h5 round trip.
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_unit_range")(inputs)
    if standardise not in STANDARDISE:
        raise ValueError(f"standardise must be one of {STANDARDISE}, not {standardise!r}")
    if standardise != "off":
        x = ColourStandardisation(per_channel=standardise == "colour", name="colour_standardisation")(x)
    base = keras.applications.MobileNetV2(
        include_top=False, alpha=1.0, input_shape=(*image_size, 3), weights=weights, name=BASE_NAME
    )
    # Batch norm must stay in inference mode (ImageNet statistics, no one lab's): in Keras 3 the training flag of
    # fit() overrides this training=False, so set_trainable_from() also freezes every BatchNormalization layer.
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    # float32 output so softmax stays exact under a mixed-precision policy on the GPU.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="hematovision_mobilenetv2")


def load_model(path):
    """The Keras model at `path` (.h5 or .keras), with this module's layers known to Keras."""
    return keras.models.load_model(path, compile=False)


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def flat_layers(model: keras.Model) -> list:
    """Every layer of the model in the order it runs them, the layers of nested models (MobileNetV2) in its place."""
    found = []
    for layer in model.layers:
        found += flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return found


def set_trainable_from(model: keras.Model, first_layer: str | None) -> int:
    """Train the layers from `first_layer` on and freeze those before it, in the order the model runs them: a layer
    name of MobileNetV2 (e.g. 'block_13_expand') or of any other network, nested models included; None freezes the
    whole base and trains what follows it (the head), '' trains every layer. Batch-norm layers stay frozen, so they
    run in inference mode: batch statistics of a few labs' crops would drift from the moving averages the model is
    served with. ValueError for a name the model does not have. Returns the number of trainable layers with
    weights."""
    order = flat_layers(model)
    if first_layer is None:
        in_base = {id(layer) for layer in flat_layers(base_of(model))}
        start = max(i for i, layer in enumerate(order) if id(layer) in in_base) + 1
    elif first_layer == "":
        start = 0
    else:
        names = [layer.name for layer in order]
        if first_layer not in names:
            raise ValueError(f"the model has no layer {first_layer!r}")
        start = names.index(first_layer)
    model.trainable = True  # every nested model too: a frozen one would hold its layers' own flags back
    for i, layer in enumerate(order):
        layer.trainable = i >= start and not isinstance(layer, layers.BatchNormalization)
    return sum(bool(layer.trainable and layer.weights) for layer in order)
