"""Training throughput on an accelerator, any Keras backend, data resident on the device: images per second of a
MobileNetV2 training step (random 0-255 inputs, Adam) for the recipe's settings and full fine-tuning, in float32
and mixed bfloat16, at two batch sizes; then what the one-command trainer's NumPy augmentation
(training/augment.py) can feed, in one thread and in one thread per CPU; and the recipe's training phase
(its epochs over the recipe's number of crops) timed from those rates.

    KERAS_BACKEND=torch python bench/bench_training_gpu.py --out bench/results/bench_training_gpu_torch.json

Weights are random (the speed of a step does not depend on them); nothing is downloaded. Each row is written as
soon as it is measured, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (size, first trained layer, dtype policy, batch): the recipe trains from block_6_expand at 160 px, then 224.
CONFIGS = [
    (160, "block_6_expand", "float32", 64),
    (224, "block_6_expand", "float32", 64),
    (160, "block_6_expand", "float32", 256),
    (160, "block_6_expand", "mixed_bfloat16", 256),
    (224, "block_6_expand", "mixed_bfloat16", 256),
    (224, "", "float32", 256),
    (224, "", "mixed_bfloat16", 256),
]
# The shipped recipe (training/train.py defaults; its metadata's training.data): crops per epoch (Kaggle 1,879 +
# PBC 2,159 + LISC 560 twice) and its epochs: 1 head-only and 8 at 160 px, then 2 at 224.
# train.py's own loop: (size, batch, augmenting workers, in processes rather than threads: measured slower, each
# batch is pickled between processes, so train.py uses threads).
FIT_CONFIGS = [(160, 64, 1, False), (160, 64, 16, False), (160, 256, 16, False), (224, 256, 16, False),
               (160, 64, 16, True), (160, 256, 16, True), (224, 256, 16, True)]
RECIPE_CROPS = 1879 + 2159 + 2 * 560
RECIPE_EPOCHS = {(160, "head"): 1, (160, "block_6_expand"): 8, (224, "block_6_expand"): 2}


def device_name() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "cpu"


def step_speed(size: int, first: str | None, policy: str, batch: int, seconds: float = 8.0,
               jit: bool | str = "auto") -> dict:
    import keras

    from hematovision.network import build_model, set_trainable_from

    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_model(4, weights=None, image_size=(size, size))
        set_trainable_from(model, first)
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                      jit_compile=jit)
        rng = np.random.default_rng(0)
        # Resident on the device: converted once, never copied from the host again.
        x = keras.ops.convert_to_tensor(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
        y = keras.ops.convert_to_tensor((np.arange(batch) % 4).astype(np.int32))
        started = time.perf_counter()
        for _ in range(3):  # warm-up: kernels chosen, graphs built
            model.train_on_batch(x, y)
        warm_up = time.perf_counter() - started
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.train_on_batch(x, y)  # returns the loss as a number: one device sync per step
            steps += 1
        rate = batch * steps / (time.perf_counter() - started)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"images_per_s": round(rate, 1), "steps": steps, "warm_up_s": round(warm_up, 1)}


def fit_speed(size: int, batch: int, workers: int, crops: int = 4096, processes: bool = False) -> dict:
    """train.py's own loop: its PyDataset of augmented batches (`workers` threads) and model.fit, from the host
    (crops in memory, as train.py holds them); the second of two epochs is timed."""
    import keras

    from hematovision.network import build_model, set_trainable_from
    from training.train import batches

    rng = np.random.default_rng(0)
    x = {"all": rng.integers(0, 256, (crops, 224, 224, 3), dtype=np.uint8)}
    y = {"all": (np.arange(crops) % 4).astype(np.int64)}
    model = build_model(4, weights=None, image_size=(None, None))
    set_trainable_from(model, "block_6_expand")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    ends = []
    timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter()))
    model.fit(batches(x, y, {}, size, batch, 0, 0, workers=workers, processes=processes), epochs=2,
              callbacks=[timer], verbose=0)
    steps = crops // batch
    return {"images_per_s": round(steps * batch / (ends[1] - ends[0]), 1), "steps": steps}


def augment_speed(threads: int, size: int = 160, batch: int = 64, batches: int = 24) -> float:
    from training.augment import augment

    crops = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)

    def one(i: int) -> None:
        augment(crops, size, np.random.default_rng([0, i]))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))  # warm-up
        started = time.perf_counter()
        list(pool.map(one, range(batches)))
    return batch * batches / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_training_gpu.json")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    p.add_argument("--fit", action="store_true",
                   help="also train.py's own loop (its augmenting PyDataset and model.fit) at 1 and N threads")
    p.add_argument("--jit", action="store_true",
                   help="at the end, the recipe's 160 px step compiled (jit_compile=True: torch.compile on torch)")
    p.add_argument("--only-fit", action="store_true", help="train.py's loop alone (no step or augment rows)")
    args = p.parse_args(argv)
    args.fit_configs = FIT_CONFIGS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    result = {"backend": keras.backend.backend(), "device": device_name(), "cpu_count": os.cpu_count(),
              "keras": keras.__version__, "python": platform.python_version(), "data": "resident on the device",
              "steps": [], "augment": {}}
    if result["backend"] == "torch":
        import torch

        result["torch"] = torch.__version__

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(result, flush=True)
    for size, first, policy, batch in [] if args.only_fit else CONFIGS:
        row = {"size": size, "trained_from": first or "all", "policy": policy, "batch": batch}
        try:
            row.update(step_speed(size, first, policy, batch, args.seconds))
        except Exception as error:  # a configuration the backend cannot run is a result too
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        print(row, flush=True)
        result["steps"].append(row)
        save()
    if not args.only_fit:  # the head-only epoch trains the dense layer alone: time it as such
        row = {"size": 160, "trained_from": "head only", "policy": "float32", "batch": 64}
        row.update(step_speed(160, None, "float32", 64, args.seconds))
        print(row, flush=True)
        result["steps"].append(row)
    if args.fit or args.only_fit:
        result["fit"] = []
        for size, batch, workers, processes in args.fit_configs:
            workers = min(workers, os.cpu_count() or 1)
            row = {"size": size, "batch": batch, "loader_workers": workers,
                   "loader": "processes" if processes else "threads", "trained_from": "block_6_expand"}
            try:
                row.update(fit_speed(size, batch, workers, processes=processes))
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            print(row, flush=True)
            result["fit"].append(row)
            save()
    if args.only_fit:
        return 0
    if args.jit:
        row = {"size": 160, "trained_from": "block_6_expand", "policy": "float32", "batch": 256, "jit_compile": True}
        try:
            row.update(step_speed(160, "block_6_expand", "float32", 256, args.seconds, jit=True))
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        print(row, flush=True)
        result["steps"].append(row)
        save()
    for threads in sorted({1, os.cpu_count() or 1}):
        result["augment"][f"{threads}_threads_images_per_s"] = round(augment_speed(threads), 1)
        print(result["augment"], flush=True)
        save()
    # The recipe's training phase from these rates (batch 64, float32, as train.py runs it), without and with the
    # NumPy augmentation as the feed (train.py's PyDataset augments in one background thread).
    rate = {("head" if r["trained_from"] == "head only" else r["trained_from"], r["size"]): r["images_per_s"]
            for r in result["steps"] if r["batch"] == 64 and r["policy"] == "float32" and "images_per_s" in r}
    feed = result["augment"]["1_threads_images_per_s"]
    network = sum(RECIPE_CROPS * n / rate[(first, size)] for (size, first), n in RECIPE_EPOCHS.items())
    fed = sum(RECIPE_CROPS * n / min(rate[(first, size)], feed) for (size, first), n in RECIPE_EPOCHS.items())
    result["recipe_training_phase"] = {
        "crops_per_epoch": RECIPE_CROPS, "epochs": {f"{f}@{s}": n for (s, f), n in RECIPE_EPOCHS.items()},
        "network_only_minutes": round(network / 60, 2), "with_one_augment_thread_minutes": round(fed / 60, 2)}
    print(result["recipe_training_phase"], flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
