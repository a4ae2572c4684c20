"""Train the HematoVision white-blood-cell classifier (MobileNetV2 transfer learning) on two labs' images.

The shipped model/blood_cell_model.h5 is one run of this script with its defaults, from the repository root, with
the Kaggle set at ../shared/data/blood-cells, PBC at ../shared/data/pbc-4class and the offline ImageNet weights
at ../shared/weights. On a GPU (it was made on one H200, Keras on the PyTorch backend, bf16; 426 s while three
other runs shared the GPU: variant G of `training/ablation.py --set longer`):

    KERAS_BACKEND=torch python training/train.py \
        --data-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN --pbc-dir ../shared/data/pbc-4class \
        --weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_bnrecal_no_top_legacy.h5

(That run had --max-minutes 8.3, which planned exactly these 17 fine-tuning epochs; early stopping did not fire.)
On a CPU-only machine the same command without KERAS_BACKEND (TensorFlow, Keras Model.fit, float32) runs the
same recipe at about 15 minutes per epoch on 2 cores: about 4.5 hours for its 1 + 17 epochs (extrapolated from
5.2 s per fine-tuning step of 64 images measured with --limit 120; not timed end to end). The two backends use
the same seeds, data, augmentation and schedule but not the same random streams or arithmetic, so a rerun gives a
model of the same quality, not the same bytes. `--weights imagenet` (the default) lets Keras download the
ImageNet weights on a connected machine. The metadata JSON beside the model records the command, history, timing.

Recipe: decode -> RGB -> 224x224 (hematovision.imaging, the same path the app uses); Kaggle's validation split
cut from TRAIN by whole source photo (training/splits/kaggle_train_sources.csv, see training/group_sources.py),
PBC's by the committed stratified split (training/splits/pbc_split.csv, see training/split_pbc.py); phase 1
trains the head on a frozen base for one epoch, phase 2 unfreezes the whole base and fine-tunes 17 epochs with
Adam (3e-4, batches of 128) and a cosine learning-rate decay, keeping the weights of the best validation loss.
Augmentation: any rotation, mirror, +-15% scale, +-10% shift (`--augment stain` adds stain/colour/blur jitter
and +-35% scale; the ablation found it did not pay within the same time budget). TEST, TEST_SIMPLE and PBC's test
rows are never read here: evaluate them with training/evaluate.py.
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

from hematovision.network import AUGMENTATIONS  # noqa: E402

DEFAULTS = {
    "out": ROOT / "model" / "blood_cell_model.h5",
    "sources": ROOT / "training" / "splits" / "kaggle_train_sources.csv",
    "pbc_split": ROOT / "training" / "splits" / "pbc_split.csv",
    "weights": "imagenet",
    "val_fraction": 0.15,
    "seed": 1337,
    "batch_size": 128,
    "head_epochs": 1,
    "head_lr": 1e-3,
    "epochs": 17,
    "lr": 3e-4,
    "patience": 6,
    "fine_tune_from": "",  # "" = the whole base; a MobileNetV2 layer name = from that layer up
    "dropout": 0.2,
    "mixed_precision": "auto",
    "augment": "geometric",
    "schedule": "cosine",
    "loop": "auto",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder per class, e.g. .../images/TRAIN")
    p.add_argument("--out", type=Path, default=DEFAULTS["out"], help="output .h5 (metadata goes next to it)")
    p.add_argument("--sources", type=Path, default=DEFAULTS["sources"],
                   help="CSV path,label,source_id grouping images by source photo (for the validation split)")
    p.add_argument("--weights", default=DEFAULTS["weights"], help="'imagenet', a local .h5 path, or 'none'")
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="weights, shuffling, augmentation")
    p.add_argument("--split-seed", type=int, default=DEFAULTS["seed"],
                   help="which source photos are held out for validation (keep it fixed to compare runs)")
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
                   help="stop fine-tuning after this much wall time (0 = no limit); best weights are kept. "
                        "The torch loop plans its fine-tuning epochs to fit (timed before it starts)")
    p.add_argument("--pbc-dir", type=Path,
                   help="the PBC set (second lab), folder per class: its train rows join training, its validation "
                        "rows join validation")
    p.add_argument("--pbc-split", type=Path, default=DEFAULTS["pbc_split"],
                   help="CSV path,label,split from training/split_pbc.py")
    p.add_argument("--augment", choices=AUGMENTATIONS, default=DEFAULTS["augment"],
                   help="'geometric': flips, turns, zoom, shift; 'stain': also lab-to-lab colour, scale and blur")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=DEFAULTS["schedule"],
                   help="fine-tuning learning rate: constant, or cosine decay to 0 over the planned epochs")
    p.add_argument("--loop", choices=["auto", "fit", "torch"], default=DEFAULTS["loop"],
                   help="'fit': keras Model.fit (any backend); 'torch': training/torch_loop.py (data on the GPU); "
                        "auto = torch on the PyTorch backend, else fit")
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


def fit_keras(args, model, augmenter, x_train, y_train, x_val, y_val, val_domains, record, started):
    """Both phases with keras Model.fit (any backend; the CPU path). Returns (head epochs, fine-tuning epochs,
    best epoch, stopped by the time budget)."""
    import keras

    from hematovision.imaging import IMAGE_SIZE
    from hematovision.network import set_trainable_from

    train_data = make_batches(x_train, y_train, args.batch_size, True, args.seed)
    val_data = make_batches(x_val, y_val, args.batch_size, False, args.seed)
    inputs = keras.Input(shape=(*IMAGE_SIZE, 3))
    trainer = keras.Model(inputs, model(augmenter(inputs)), name="trainer")
    verbose = 1 if sys.stdout.isatty() else 2
    by_domain = _domain_logger(model, x_val, y_val, val_domains)

    def run_phase(epochs: int, lr, callbacks=()):
        trainer.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                        metrics=["accuracy"])
        h = trainer.fit(train_data, validation_data=val_data, epochs=epochs, verbose=verbose,
                        callbacks=[*callbacks, by_domain])
        record(h.history)
        record(by_domain.pop())
        return len(h.history["loss"])

    set_trainable_from(model, None)
    print(f"phase 1: head only, {args.head_epochs} epochs at lr {args.head_lr}")
    head_epochs_run = run_phase(args.head_epochs, args.head_lr) if args.head_epochs else 0
    fine_epochs_run, best_epoch, deadline = 0, None, _deadline(started, args.max_minutes)
    if args.epochs:
        n = set_trainable_from(model, args.fine_tune_from)
        print(f"phase 2: fine-tuning {n} base layers, up to {args.epochs} epochs at lr {args.lr} ({args.schedule})")
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True)
        start_loss = None
        if args.init_model and len(y_val):
            trainer.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            start_loss = float(trainer.evaluate(val_data, verbose=0, return_dict=True)["loss"])
            print(f"validation loss of --init-model: {start_loss:.4f}")
        lr = args.lr
        if args.schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=args.epochs * len(train_data))
        fine_epochs_run = run_phase(args.epochs, lr, [stop, deadline])
        best_epoch = head_epochs_run + stop.best_epoch + 1
        if keep_start_if_not_beaten(model, args.init_model, start_loss, stop.best):
            best_epoch = 0
    return head_epochs_run, fine_epochs_run, best_epoch, deadline.hit


def keep_start_if_not_beaten(model, init_model: Path | None, start_loss: float | None, best_loss: float) -> bool:
    """Continuing from --init-model made validation worse: put its weights back. True when it did."""
    if start_loss is None or best_loss < start_loss:
        return False
    print(f"no epoch beat the starting validation loss {start_loss:.4f}; keeping --init-model's weights")
    model.load_weights(init_model)
    return True


def _domain_logger(model, x_val, y_val, val_domains):
    """Validation accuracy per data source (Kaggle / PBC) after each epoch, kept apart from Keras' own logs."""
    import keras

    class DomainAccuracy(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logs: dict[str, list[float]] = {}

        def on_epoch_end(self, epoch, logs=None):
            if len(np.unique(val_domains)) < 2:
                return
            probs = model.predict(x_val.astype(np.float32), batch_size=64, verbose=0)
            for domain, accuracy in domain_accuracy(probs, y_val, val_domains).items():
                self.logs.setdefault(f"val_accuracy_{domain}", []).append(accuracy)

        def pop(self):
            logs, self.logs = self.logs, {}
            return logs

    return DomainAccuracy()


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


def load_pbc(pbc_dir: Path, split_csv: Path, split: str, labels: list[str], limit: int, workers):
    """Arrays of one split of the PBC set, by the committed split CSV (labels mapped to this model's order)."""
    from hematovision.datasets import load_arrays
    from training.evaluate import split_rows

    image_set = split_rows(pbc_dir, split_csv, split, labels)
    paths, targets = image_set.paths, image_set.targets
    if limit:
        keep = [i for k in range(len(labels)) for i in [j for j, t in enumerate(targets) if t == k][:limit]]
        paths, targets = [paths[i] for i in keep], [targets[i] for i in keep]
    return load_arrays(paths, workers=workers), np.asarray(targets, dtype=np.int32)


def domain_accuracy(probs: np.ndarray, y: np.ndarray, domains: np.ndarray) -> dict:
    return {str(d): float((probs[domains == d].argmax(1) == y[domains == d]).mean()) for d in np.unique(domains)}


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
    loop = args.loop if args.loop != "auto" else ("torch" if keras.backend.backend() == "torch" else "fit")
    print(f"Keras {keras.__version__} on {keras.backend.backend()}, device: {device}, mixed precision: {use_mixed}, "
          f"loop: {loop}, augmentation: {args.augment}")

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
    train_idx, val_idx = split_by_group(image_set.targets, groups, args.val_fraction, args.split_seed)
    print(f"{len(image_set.paths)} images, classes {image_set.labels}; skipped folders: {image_set.skipped_folders}")
    print(f"split by source photo: {len(train_idx)} train / {len(val_idx)} validation images, "
          f"{len(set(np.asarray(groups)[val_idx]))} held-out groups")

    t0 = time.time()
    workers = args.workers or None
    x = load_arrays(image_set.paths, workers=workers)
    y = np.asarray(image_set.targets, dtype=np.int32)
    x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    val_domains = np.full(len(val_idx), "kaggle")
    pbc_counts = None
    if args.pbc_dir:
        xp_train, yp_train = load_pbc(args.pbc_dir, args.pbc_split, "train", image_set.labels, args.limit, workers)
        xp_val, yp_val = load_pbc(args.pbc_dir, args.pbc_split, "validation", image_set.labels, args.limit, workers)
        x_train, y_train = np.concatenate([x_train, xp_train]), np.concatenate([y_train, yp_train])
        x_val, y_val = np.concatenate([x_val, xp_val]), np.concatenate([y_val, yp_val])
        val_domains = np.concatenate([val_domains, np.full(len(yp_val), "pbc")])
        pbc_counts = {"train": int(len(yp_train)), "validation": int(len(yp_val))}
        print(f"PBC ({args.pbc_split.name}): {len(yp_train)} train / {len(yp_val)} validation images added")
    del x
    print(f"decoded {len(x_train) + len(x_val)} images in {time.time() - t0:.1f} s")

    # The augmenter stays float32 (it is built before any mixed policy); only the network computes in bf16.
    augmenter = build_augmenter(args.seed, args.augment)
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
    history: dict[str, list[float]] = {}

    def record(h: dict):
        for key, values in h.items():
            history.setdefault(key, []).extend(float(v) for v in values)

    deadline_at = started + args.max_minutes * 60 if args.max_minutes else 0.0
    plan = {}
    if loop == "torch":
        from training.torch_loop import TorchTrainer

        trainer = TorchTrainer(model, augmenter, x_train, y_train, x_val, y_val, val_domains, args.batch_size,
                               args.seed)
        set_trainable_from(model, None)
        print(f"phase 1: head only, {args.head_epochs} epochs at lr {args.head_lr}")
        head = trainer.run_phase(args.head_epochs, args.head_lr, "constant") if args.head_epochs else None
        head_epochs_run = len(head["history"]["loss"]) if head else 0
        if head:
            record(head["history"])
        fine_epochs_run, best_epoch, hit_deadline = 0, None, False
        if args.epochs:
            n = set_trainable_from(model, args.fine_tune_from)
            epochs = args.epochs
            start_loss = trainer.evaluate()["val_loss"] if args.init_model else None
            if deadline_at:
                t_eval = time.time()
                trainer.evaluate()
                eval_s = time.time() - t_eval
                epoch_s = trainer.time_steps() * trainer.steps_per_epoch + eval_s
                left = deadline_at - time.time() - 30  # leave time to export and save
                epochs = max(1, min(args.epochs, int(left // epoch_s)))
                plan = {"seconds_per_epoch_estimate": round(epoch_s, 1), "planned_epochs": epochs}
                print(f"time plan: ~{epoch_s:.1f} s per epoch -> {epochs} fine-tuning epochs")
            print(f"phase 2: fine-tuning {n} base layers, {epochs} epochs at lr {args.lr} ({args.schedule})")
            fine = trainer.run_phase(epochs, args.lr, args.schedule, patience=args.patience, deadline=deadline_at)
            record(fine["history"])
            fine_epochs_run = len(fine["history"]["loss"])
            best_epoch = head_epochs_run + (fine["best_epoch"] or fine_epochs_run)
            hit_deadline = fine["stopped_by_time_budget"]
            if keep_start_if_not_beaten(model, args.init_model, start_loss, fine["best"]):
                best_epoch = 0
    else:
        head_epochs_run, fine_epochs_run, best_epoch, hit_deadline = fit_keras(
            args, model, augmenter, x_train, y_train, x_val, y_val, val_domains, record, started)

    # Export in float32 whatever policy trained it: the served model must not carry a GPU-only dtype policy.
    keras.mixed_precision.set_global_policy("float32")
    export = build_model(len(image_set.labels), weights=None, dropout=args.dropout)
    export.set_weights(model.get_weights())
    val_probs = export.predict(x_val.astype(np.float32), batch_size=64, verbose=0) if len(y_val) else None
    val_accuracy = float((val_probs.argmax(1) == y_val).mean()) if val_probs is not None else None
    val_by_domain = domain_accuracy(val_probs, y_val, val_domains) if val_probs is not None else {}
    print(f"validation accuracy (held-out source photos / PBC validation rows, float32 export): {val_accuracy} "
          f"{val_by_domain}")

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
            "train_images": int(len(y_train)),
            "validation_images": int(len(y_val)),
            "pbc": ({"dir": args.pbc_dir.as_posix(), "split_csv": args.pbc_split.name, **pbc_counts}
                    if pbc_counts else None),
            "augmentation": args.augment,
            "loop": loop,
            "validation_split": f"{args.val_fraction} of source photos per class, seed {args.split_seed}, "
                                f"grouped by {args.sources.name if args.sources else 'file'}",
            "validation_groups": len(set(np.asarray(groups)[val_idx])),
            "base_weights": Path(args.weights).name if weights else "none",
            "settings": {k: (v.as_posix() if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("data_dir", "out", "sources", "init_model", "pbc_dir", "pbc_split")},
            "epochs_run": {"head": head_epochs_run, "fine_tune": fine_epochs_run, "best_epoch": best_epoch,
                           "stopped_by_time_budget": hit_deadline, **plan},
            "history": history,
            "device": device,
            "mixed_precision": use_mixed,
            "seconds": round(time.time() - started, 1),
            "continued_from": ({"model": args.init_model.name, "training": previous} if args.init_model else None),
        },
        "versions": library_versions(),
        "validation": {"accuracy": val_accuracy, "n": int(len(y_val)), "by_domain": val_by_domain},
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
