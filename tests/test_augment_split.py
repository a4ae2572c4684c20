"""Training-time pieces: the PBC split, the augmentation layers, the learning-rate schedule."""

import numpy as np
import pytest

from hematovision.network import RandomLighting, RandomPlacement, RandomStainJitter, build_augmenter
from training.split_pbc import assign_splits
from training.torch_loop import cosine_lr


def test_pbc_split_is_stratified_disjoint_and_fixed_by_the_seed():
    files = {label: [f"{label}/{i:03d}.jpg" for i in range(50)] for label in ("A", "B")}
    rows = assign_splits(files, seed=5)
    assert rows == assign_splits(files, seed=5) and rows != assign_splits(files, seed=6)
    assert len({path for path, _, _ in rows}) == 100  # every file once
    for label in ("A", "B"):
        counts = {s: sum(1 for _, lab, split in rows if lab == label and split == s)
                  for s in ("train", "validation", "test")}
        assert counts == {"train": 30, "validation": 10, "test": 10}


@pytest.mark.parametrize("layer", [RandomPlacement(0.35, 0.1, seed=1), RandomStainJitter(0.1, seed=2),
                                   RandomLighting(seed=3)])
def test_augmentation_layers_keep_shape_and_range_and_are_off_at_inference(layer):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (3, 224, 224, 3)).astype(np.float32)
    out = np.asarray(layer(x, training=True))
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 255.0 + 1e-3
    assert not np.allclose(out, x)  # it did something
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_stain_jitter_at_zero_strength_is_the_identity():
    x = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(RandomStainJitter(0.0)(x, training=True)), x)


def test_placement_keeps_a_centred_cell_in_view():
    """A bright disc in the middle stays bright after any turn, mirror, scale and shift (black fill outside)."""
    yy, xx = np.mgrid[:224, :224]
    disc = (((yy - 111.5) ** 2 + (xx - 111.5) ** 2) < 40 ** 2).astype(np.float32) * 255
    x = np.repeat(np.stack([disc] * 8)[..., None], 3, axis=-1)
    out = np.asarray(RandomPlacement(0.15, 0.1, seed=4)(x, training=True))
    assert (out[:, 100:124, 90:134] > 200).mean() > 0.9


def test_unknown_augmentation_recipe_is_refused():
    with pytest.raises(ValueError, match="augmentation must be one of"):
        build_augmenter(0, "everything")


def test_cosine_schedule_matches_keras_cosine_decay():
    import keras

    keras_schedule = keras.optimizers.schedules.CosineDecay(2e-4, decay_steps=100)
    for step in (0, 1, 37, 50, 99, 100, 150):  # Keras computes in float32
        assert cosine_lr(2e-4, step, 100) == pytest.approx(float(keras_schedule(step)), rel=1e-4, abs=1e-9)
