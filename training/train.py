"""Train the HematoVision white-blood-cell classifier (MobileNetV2 transfer learning).

The shipped model/blood_cell_model.h5 was made in two runs of this script, from the repository root, with the
Kaggle set at ../shared/data/blood-cells and the offline ImageNet weights at ../shared/weights:

 1. On a lent GPU (one H200, Keras on the PyTorch backend, bf16 mixed precision), 8 minutes; its 7.5-minute
    budget ended fine-tuning after 3 head epochs and 4 fine-tuning epochs (record: model/provenance/):

    KERAS_BACKEND=torch python training/train.py \
        --data-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN \
        --weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_bnrecal_no_top_legacy.h5 --max-minutes 7.5

 2. Continued on the 2-core CPU (TensorFlow backend, float32) at a lower learning rate, early-stopped on the
    same grouped validation split, starting from run 1's output (here copied to /tmp/gpu_stage/):

    python training/train.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN \
        --weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_bnrecal_no_top_legacy.h5 \
        --init-model /tmp/gpu_stage/blood_cell_model.h5 --head-epochs 0 --lr 3e-5 --epochs 8 --patience 2 \
        --max-minutes 58 --out /tmp/stage2/blood_cell_model.h5      (then copied into model/)

The metadata JSON beside the model records each run's command, history and timing. On a CPU-only machine a
single run with the defaults fine-tunes the whole base at ~10-13 min per epoch on 2 cores (hours in all);
`--fine-tune-from block_13_expand` trains only the top blocks, about 3x cheaper. `--weights imagenet` (the default)
lets Keras download the ImageNet weights on a connected machine. With a GPU, install PyTorch and set
KERAS_BACKEND=torch (or use a CUDA build of TensorFlow); mixed precision switches on by itself.

Recipe: decode -> RGB -> 224x224 (hematovision.imaging, the same path the app uses); validation cut from TRAIN
by whole source photo (training/splits/kaggle_train_sources.csv, see training/group_sources.py); phase 1 trains
the head on a frozen base, phase 2 unfreezes the base from --fine-tune-from and fine-tunes with early stopping
on validation loss. TEST and TEST_SIMPLE are never read here: evaluate them with training/evaluate.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python training/train.py` from the repo root
    sys.path.insert(0, str(ROOT))

DEFAULTS = {
    "out": ROOT / "model" / "blood_cell_model.h5",
    "sources": ROOT / "training" / "splits" / "kaggle_train_sources.csv",
    "weights": "imagenet",
    "val_fraction": 0.15,
    "seed": 1337,
    "batch_size": 32,
    "head_epochs": 3,
    "head_lr": 1e-3,
    "epochs": 14,
    "lr": 1e-4,
    "patience": 4,
    "fine_tune_from": "",  # "" = the whole base; a MobileNetV2 layer name = from that layer up
    "dropout": 0.2,
    "mixed_precision": "auto",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder per class, e.g. .../images/TRAIN")
    p.add_argument("--out", type=Path, default=DEFAULTS["out"], help="output .h5 (metadata goes next to it)")
    p.add_argument("--sources", type=Path, default=DEFAULTS["sources"],
                   help="CSV path,label,source_id grouping images by source photo (for the validation split)")
    p.add_argument("--weights", default=DEFAULTS["weights"], help="'imagenet', a local .h5 path, or 'none'")
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--head-epochs", type=int, default=DEFAULTS["head_epochs"])
    p.add_argument("--head-lr", type=float, default=DEFAULTS["head_lr"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="max fine-tuning epochs (0 = head only)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="fine-tuning learning rate")
    p.add_argument("--patience", type=int, default=DEFAULTS["patience"])
    p.add_argument("--fine-tune-from", default=DEFAULTS["fine_tune_from"])
    p.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    p.add_argument("--mixed-precision", choices=["auto", "on", "off"], default=DEFAULTS["mixed_precision"])
    p.add_argument("--limit", type=int, default=0, help="use at most N images per class (smoke runs)")
    p.add_argument("--workers", type=int, default=0, help="decode threads (0 = all cores)")
    p.add_argument("--init-model", type=Path,
                   help="continue from this .h5 (a model made by this script) instead of fresh ImageNet weights")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop fine-tuning after this much wall time (0 = no limit); best weights are kept")
    return p.parse_args(argv)


def read_sources(csv_path: Path, relative_paths: list[str]) -> list[str]:
    """Group id of each image: its source photo where the CSV knows it, else the file itself (with a warning)."""
    known: dict[str, str] = {}
    if csv_path and Path(csv_path).is_file():
        with open(csv_path, newline="") as f:
            known = {row["path"]: f"src{row['source_id']}" for row in csv.DictReader(f)}
    groups = [known.get(rel, f"file:{rel}") for rel in relative_paths]
    unknown = sum(g.startswith("file:") for g in groups)
    if unknown:
        print(f"WARNING: {unknown} of {len(groups)} images have no known source photo; each is its own group. "
              "If they are augmented copies of each other the validation figure will be optimistic.")
    return groups


def split_by_group(targets: list[int], groups: list[str], fraction: float, seed: int):
    """Hold out whole groups, per class, so no source photo is on both sides."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    groups = np.asarray(groups)
    val = np.zeros(len(targets), bool)
    for label in np.unique(targets):
        class_groups = np.unique(groups[targets == label])
        rng.shuffle(class_groups)
        n_val = max(1, int(round(fraction * len(class_groups)))) if len(class_groups) > 1 else 0
        val |= (targets == label) & np.isin(groups, class_groups[:n_val])
    return np.flatnonzero(~val), np.flatnonzero(val)


def detect_device() -> str:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return f"GPU ({gpus[0].name})" if gpus else "CPU"
        if backend == "torch":
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            return f"GPU ({device.device_kind})" if device.platform == "gpu" else "CPU"
    except Exception:  # device probing is informational only
        pass
    return "CPU"


def make_batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int):
    """A keras.utils.PyDataset over in-memory uint8 arrays: works on every backend, shuffles each epoch."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(x))
            self.on_epoch_end()

        def __len__(self):
            return int(np.ceil(len(x) / batch_size))

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            return x[idx].astype(np.float32), y[idx]

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

    return Batches()


def _deadline(started: float, minutes: float):
    """Stop after the epoch that crosses a wall-time budget (a lent GPU is time-limited)."""
    import keras

    class Deadline(keras.callbacks.Callback):
        hit = False

        def on_epoch_end(self, epoch, logs=None):
            if minutes and time.time() - started > minutes * 60:
                print(f"time budget of {minutes} min reached after epoch {epoch + 1}")
                self.model.stop_training = self.hit = True

    return Deadline()


def plot_history(history: dict, phase_1_epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ["accuracy", "loss"], strict=True):
        ax.plot(epochs, history[metric], label=f"train {metric}")
        ax.plot(epochs, history[f"val_{metric}"], label=f"validation {metric} (held-out source photos)")
        if phase_1_epochs and phase_1_epochs < len(epochs):
            ax.axvline(phase_1_epochs + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def library_versions() -> dict:
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
                "backend": keras.backend.backend()}
    try:
        backend_module = __import__({"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}[versions["backend"]])
        versions[versions["backend"]] = backend_module.__version__
    except Exception:
        pass
    return versions


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    import keras

    from hematovision.datasets import list_images, load_arrays
    from hematovision.imaging import IMAGE_SIZE
    from hematovision.network import build_augmenter, build_model, set_trainable_from

    keras.utils.set_random_seed(args.seed)
    device = detect_device()
    use_mixed = args.mixed_precision == "on" or (args.mixed_precision == "auto" and device.startswith("GPU"))
    print(f"Keras {keras.__version__} on {keras.backend.backend()}, device: {device}, mixed precision: {use_mixed}")

    image_set = list_images(args.data_dir)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(np.asarray(image_set.targets) == k))[:args.limit]
                               for k in range(len(image_set.labels))])
        keep.sort()
        image_set.paths = [image_set.paths[i] for i in keep]
        image_set.targets = [image_set.targets[i] for i in keep]
    relative = [image_set.relative(p) for p in image_set.paths]
    groups = read_sources(args.sources, relative)
    train_idx, val_idx = split_by_group(image_set.targets, groups, args.val_fraction, args.seed)
    print(f"{len(image_set.paths)} images, classes {image_set.labels}; skipped folders: {image_set.skipped_folders}")
    print(f"split by source photo: {len(train_idx)} train / {len(val_idx)} validation images, "
          f"{len(set(np.asarray(groups)[val_idx]))} held-out groups")

    t0 = time.time()
    x = load_arrays(image_set.paths, workers=args.workers or None)
    y = np.asarray(image_set.targets, dtype=np.int32)
    print(f"decoded {len(x)} images in {time.time() - t0:.1f} s")
    train_data = make_batches(x[train_idx], y[train_idx], args.batch_size, True, args.seed)
    val_data = make_batches(x[val_idx], y[val_idx], args.batch_size, False, args.seed)

    if use_mixed:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    weights = None if args.weights.lower() == "none" else args.weights
    model = build_model(len(image_set.labels), weights=None if args.init_model else weights, dropout=args.dropout)
    previous = None
    if args.init_model:
        # Weights only: the architecture is rebuilt here, under whatever dtype policy this run uses.
        model.load_weights(args.init_model)
        meta = args.init_model.with_suffix(".json")
        previous = json.loads(meta.read_text(encoding="utf-8")).get("training") if meta.is_file() else None
        if previous and previous.get("class_counts") and list(previous["class_counts"]) != image_set.labels:
            raise SystemExit(f"--init-model was trained on {list(previous['class_counts'])}, not {image_set.labels}")
    inputs = keras.Input(shape=(*IMAGE_SIZE, 3))
    trainer = keras.Model(inputs, model(build_augmenter(args.seed)(inputs)), name="trainer")
    verbose = 1 if sys.stdout.isatty() else 2
    history: dict[str, list[float]] = {}

    def run_phase(epochs: int, lr: float, callbacks=()):
        trainer.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                        metrics=["accuracy"])
        h = trainer.fit(train_data, validation_data=val_data, epochs=epochs, verbose=verbose,
                        callbacks=list(callbacks))
        for key, values in h.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        return len(h.history["loss"])

    set_trainable_from(model, None)
    print(f"phase 1: head only, {args.head_epochs} epochs at lr {args.head_lr}")
    head_epochs_run = run_phase(args.head_epochs, args.head_lr) if args.head_epochs else 0
    fine_epochs_run, best_epoch, deadline = 0, None, _deadline(started, args.max_minutes)
    if args.epochs:
        n = set_trainable_from(model, args.fine_tune_from)
        print(f"phase 2: fine-tuning {n} base layers, up to {args.epochs} epochs at lr {args.lr}")
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True)
        start_loss = None
        if args.init_model and len(val_idx):
            trainer.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            start_loss = float(trainer.evaluate(val_data, verbose=0, return_dict=True)["loss"])
            print(f"validation loss of --init-model: {start_loss:.4f}")
        fine_epochs_run = run_phase(args.epochs, args.lr, [stop, deadline])
        best_epoch = head_epochs_run + stop.best_epoch + 1
        if start_loss is not None and stop.best >= start_loss:
            # Continuing made validation worse: keep the model we started from.
            print(f"no epoch beat the starting validation loss {start_loss:.4f}; keeping --init-model's weights")
            model.load_weights(args.init_model)
            best_epoch = 0

    # Export in float32 whatever policy trained it: the served model must not carry a GPU-only dtype policy.
    keras.mixed_precision.set_global_policy("float32")
    export = build_model(len(image_set.labels), weights=None, dropout=args.dropout)
    export.set_weights(model.get_weights())
    val_probs = export.predict(x[val_idx].astype(np.float32), batch_size=64, verbose=0) if len(val_idx) else None
    val_accuracy = float((val_probs.argmax(1) == y[val_idx]).mean()) if val_probs is not None else None
    print(f"validation accuracy (held-out source photos, float32 export): {val_accuracy}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    export.save(args.out)
    curves = args.out.with_name(args.out.stem + "_curves.png")
    if history.get("val_loss"):
        plot_history(history, head_epochs_run, curves)
    metadata = {
        "name": "HematoVision MobileNetV2 white-cell classifier",
        "labels": image_set.labels,
        "image_size": list(IMAGE_SIZE),
        "input": "RGB, 224x224, pixel values 0-255 (uint8 range); scaling to [-1, 1] is inside the model",
        "preprocessing": "hematovision.imaging.prepare_bytes: decode, EXIF orientation, RGB, bilinear resize to "
                         "224x224 (aspect ratio not kept)",
        "architecture": "MobileNetV2 alpha 1.0 (ImageNet-initialised) + global average pooling + dropout + dense",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "command": "python training/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "data_dir": args.data_dir.as_posix(),
            "images": len(image_set.paths),
            "class_counts": image_set.counts(),
            "train_images": int(len(train_idx)),
            "validation_images": int(len(val_idx)),
            "validation_split": f"{args.val_fraction} of source photos per class, seed {args.seed}, "
                                f"grouped by {args.sources.name if args.sources else 'file'}",
            "validation_groups": len(set(np.asarray(groups)[val_idx])),
            "base_weights": Path(args.weights).name if weights else "none",
            "settings": {k: (v.as_posix() if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("data_dir", "out", "sources", "init_model")},
            "epochs_run": {"head": head_epochs_run, "fine_tune": fine_epochs_run, "best_epoch": best_epoch,
                           "stopped_by_time_budget": deadline.hit},
            "history": history,
            "device": device,
            "mixed_precision": use_mixed,
            "seconds": round(time.time() - started, 1),
            "continued_from": ({"model": args.init_model.name, "training": previous} if args.init_model else None),
        },
        "versions": library_versions(),
        "validation": {"accuracy": val_accuracy, "n": int(len(val_idx))},
        "evaluation": {},
    }
    meta_path = args.out.with_suffix(".json")
    if meta_path.exists():  # keep figures measured on earlier models only if they describe this file: they don't
        print(f"replacing {meta_path}; re-run training/evaluate.py --update-metadata for test figures")
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}, {meta_path.name}, {curves.name} in {time.time() - started:.0f} s")
    return metadata


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
