"""MobileNetV2 transfer-learning network. Backend-agnostic Keras 3 (TensorFlow on CPU, PyTorch or JAX on GPU)."""

from __future__ import annotations

import keras
from keras import layers

from hematovision.imaging import IMAGE_SIZE

BASE_NAME = "mobilenetv2_1.00_224"


def build_model(num_classes: int, weights: str | None = "imagenet", dropout: float = 0.2,
                image_size: tuple[int, int] = IMAGE_SIZE) -> keras.Model:
    """uint8-range RGB in (224x224 unless `image_size` says otherwise: training may start at a lower size; the
    weights do not depend on it), softmax over `num_classes` out. All scaling lives inside the model."""
    inputs = keras.Input(shape=(*image_size, 3), name="image")
    # MobileNetV2 expects [-1, 1]; a Rescaling layer (not preprocess_input) survives an .h5 round trip.
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_unit_range")(inputs)
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


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def set_trainable_from(model: keras.Model, first_layer: str | None) -> int:
    """Freeze the base below `first_layer` (a layer name of MobileNetV2, e.g. 'block_13_expand');
    None freezes the whole base, '' unfreezes it all. Batch-norm layers stay frozen, so they run in inference
    mode: batch statistics of a few labs' crops would drift from the moving averages the model is served with.
    Returns the number of trainable base layers."""
    base = base_of(model)
    if first_layer is None:
        base.trainable = False
        return 0
    base.trainable = True
    names = [layer.name for layer in base.layers]
    start = 0 if first_layer == "" else names.index(first_layer)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not isinstance(layer, layers.BatchNormalization)
    return sum(layer.trainable for layer in base.layers)
