"""Training throughput of the levers the one-command trainer uses, on this machine: images per second of a
MobileNetV2 training step (random 0-255 inputs, batch 64, Adam) at 224 and 160 px, with the whole base trained
or the layers below block_6 frozen, in float32 and bfloat16; and the cost of the input pipeline: augmenting a
batch of canonical crops (training/augment.py) against decoding and finding the cells of its files again.

    python bench/bench_training.py                 # writes bench/results/bench_training.json

Weights are random (the speed of a step does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from _common import RESULTS, SAMPLES  # bench/: the script's own folder

CONFIGS = [  # (size, first trained layer, dtype policy)
    (224, "", "float32"),
    (224, "block_6_expand", "float32"),
    (160, "", "float32"),
    (160, "block_6_expand", "float32"),
    (160, "block_6_expand", "mixed_bfloat16"),
    (160, "block_13_expand", "float32"),
]


def step_speed(size: int, first: str, policy: str, batch: int = 64, steps: int = 6) -> float:
    import keras

    from hematovision.network import build_model, set_trainable_from

    keras.mixed_precision.set_global_policy(policy)
    model = build_model(4, weights=None, image_size=(size, size))
    set_trainable_from(model, first)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = np.arange(batch) % 4
    model.train_on_batch(x, y)  # builds the graph
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    keras.mixed_precision.set_global_policy("float32")
    return batch * steps / (time.perf_counter() - started)


def input_speed(batch: int = 64) -> dict:
    from hematovision.imaging import primary_crop_file
    from training.augment import augment

    files = sorted(SAMPLES.glob("*/*.jpeg"))
    files = (files * (batch // len(files) + 1))[:batch]
    started = time.perf_counter()
    crops = np.stack([primary_crop_file(f) for f in files])
    decode = batch / (time.perf_counter() - started)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(5):
        augment(crops, 160, rng)
    return {"decode_and_find_cells_images_per_s": round(decode, 1),
            "augment_in_memory_crops_images_per_s": round(5 * batch / (time.perf_counter() - started), 1)}


def main() -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = {"cpu_count": os.cpu_count(), "batch": 64, "steps": []}
    for size, first, policy in CONFIGS:
        speed = step_speed(size, first, policy)
        row = {"size": size, "trained_from": first or "all", "policy": policy, "images_per_s": round(speed, 1)}
        print(row, flush=True)
        result["steps"].append(row)
    result["input"] = input_speed()
    print(result["input"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_training.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
