"""Train, export, calibrate and evaluate the HematoVision white-cell classifier in one command.

    python training/train.py --data-root ../shared/data \
        --weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_bnrecal_no_top_legacy.h5 --out my_model.h5

--data-root has the layout of the README's data section: blood-cells/ (Kaggle), pbc-4class/ (PBC), lisc-crops/
(LISC). Without --weights, Keras downloads the ImageNet weights (a connected machine). The shipped model is this
command with its defaults (its metadata records the exact command, the time it took and the machine).

Steps, with one progress display:
1. data: every labelled file goes through hematovision.imaging.prepare_field, the path an upload takes (decode,
   orientation, RGB, find the white cells, one canonical 224x224 crop per cell); its primary cell's crop is kept.
   Splits (training/splits.py): Kaggle TRAIN by source photo (at most --kaggle-per-photo of the ~35 augmented
   copies of each), PBC by the committed split, LISC by cell. Test rows are cropped now but not looked at.
2. train: MobileNetV2 from ImageNet weights, layers below --fine-tune-from frozen, batch norm in inference mode
   (ImageNet statistics, no one lab's); one epoch of the head alone, then --epochs at --low-size px with a cosine
   learning rate, then --high-epochs at 224 px (train low, test high). Augmentation: training/augment.py. The
   weights of the epoch with the best mean validation accuracy over the labs are kept.
3. export: the .h5 (float32) and its TFLite twin (what the app runs).
4. calibrate: temperature and the "uncertain" rule, fitted on the validation rows (training/pipeline.py).
5. evaluate: Kaggle TEST, PBC's test rows and LISC's test cells, through the app's Classifier; crops where no
   white cell was found count as wrong. With --hold-out LAB, that lab is neither trained nor validated on: its
   test rows are then a leave-one-lab-out figure.
Nothing is written at --out until the end (all files land together); an interrupted run (Ctrl-C, a crash) keeps
`<out>.checkpoint/` (crops and the last finished epoch), which --resume continues.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from training import config, splits
from training.splits import DataError

DEFAULTS = {
    "labs": "kaggle,pbc,lisc",
    "weights": "imagenet",
    "seed": config.SEED,
    "val_fraction": 0.15,
    "kaggle_per_photo": 8,
    "kaggle_per_class": 0,
    "lisc_repeat": 2,
    "batch_size": 64,
    "head_lr": 1e-3,
    "lr": 5e-4,
    "epochs": 8,
    "high_epochs": 2,
    "high_lr": 1e-4,
    "low_size": 160,
    "fine_tune_from": "block_6_expand",
    "dropout": 0.2,
    "label_smoothing": 0.0,
    "average": 0,
    "stain": 0.15,
    "grey": 0.0,
    "lowres": 0.0,
    "lowres_most": 3.5,
    "standardise": "off",
    "contrast": 0.15,
    "restain": 0.0,
    "devices": 1,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path,
                   help="the folder holding blood-cells/, pbc-4class/, lisc-crops/")
    p.add_argument("--out", required=True, type=Path, help="the model to write (.h5; its .json, .tflite beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.checkpoint/")
    p.add_argument("--weights", default=DEFAULTS["weights"],
                   help="'imagenet' (Keras downloads them) or a local MobileNetV2 no-top .h5")
    p.add_argument("--labs", default=DEFAULTS["labs"], help="labs to train on, comma-separated")
    p.add_argument("--hold-out", choices=config.LABS, help="leave this lab out of training and validation")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"],
                   help="share of Kaggle TRAIN's source photos held out for validation")
    p.add_argument("--kaggle-per-photo", type=int, default=DEFAULTS["kaggle_per_photo"],
                   help="at most this many of the augmented copies of each Kaggle source photo")
    p.add_argument("--kaggle-per-class", type=int, default=DEFAULTS["kaggle_per_class"],
                   help="in training, about this many Kaggle files per class instead: more copies of each photo of "
                        "a class with few photos (0: --kaggle-per-photo for every class)")
    p.add_argument("--lisc-repeat", type=int, default=DEFAULTS["lisc_repeat"],
                   help="LISC's training crops are shown this many times per epoch (it is the smallest lab)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--head-lr", type=float, default=DEFAULTS["head_lr"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="fine-tuning epochs at --low-size")
    p.add_argument("--high-epochs", type=int, default=DEFAULTS["high_epochs"], help="fine-tuning epochs at 224")
    p.add_argument("--high-lr", type=float, default=DEFAULTS["high_lr"])
    p.add_argument("--low-size", type=int, default=DEFAULTS["low_size"])
    p.add_argument("--fine-tune-from", default=DEFAULTS["fine_tune_from"],
                   help="first MobileNetV2 layer trained ('' = all of them)")
    p.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"],
                   help="training targets mixed with this share of the uniform distribution over the types")
    p.add_argument("--average", type=int, default=DEFAULTS["average"],
                   help="also try the mean of the weights of the last N fine-tuning epochs; kept when its mean "
                        "validation accuracy is at least the best single epoch's (0: the best epoch)")
    p.add_argument("--stain", type=float, default=DEFAULTS["stain"],
                   help="stain jitter: haematoxylin/eosin amounts scaled by 1 +- this and shifted by +- this")
    p.add_argument("--grey", type=float, default=DEFAULTS["grey"],
                   help="share of training crops shown in grey (colour-blind cameras, stains that differ in hue)")
    p.add_argument("--lowres", type=float, default=DEFAULTS["lowres"],
                   help="share of training crops shown at a 1.5 to --lowres-most x lower resolution, JPEG-compressed")
    p.add_argument("--lowres-most", type=float, default=DEFAULTS["lowres_most"],
                   help="the lowest resolution of --lowres: this many times fewer pixels per side")
    p.add_argument("--contrast", type=float, default=DEFAULTS["contrast"],
                   help="contrast jitter: each training crop's contrast scaled by 1 +- this")
    p.add_argument("--restain", type=float, default=DEFAULTS["restain"],
                   help="share of training crops restained to colours drawn from the training crops' own "
                        "(augment.restain: RandStainNA)")
    p.add_argument("--standardise", choices=("off", "colour", "contrast"), default=DEFAULTS["standardise"],
                   nargs="?", const="colour",
                   help="standardise each image inside the model (network.ColourStandardisation): each colour "
                        "channel on its own (colour, what --standardise alone means), or brightness and contrast")
    p.add_argument("--devices", type=int, default=DEFAULTS["devices"],
                   help="data-parallel training over this many devices (GPUs, else logical CPU devices)")
    p.add_argument("--limit", type=int, default=0, help="at most N files per class and split (smoke runs)")
    p.add_argument("--workers", type=int, default=0, help="processes that find cells (0 = all cores)")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="threads that augment training batches (0: one per CPU core, at most 16, when training on "
                        "a GPU; 1 on a CPU, where the network is the slower part). Each batch has its own seed, so "
                        "the result does not depend on it")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <out>.checkpoint/ (every fine-tuning epoch's weights) after a finished run, for "
                        "training/experiments/measure_weight_average.py")
    p.add_argument("--crop-cache", type=Path,
                   help="keep the cell crops in this folder for later runs (keyed by the file list and the cell "
                        "finder's code); default: inside the run's checkpoint, removed when it ends")
    args = p.parse_args(argv)
    args.labs = [lab.strip() for lab in args.labs.split(",") if lab.strip()]
    unknown = sorted(set(args.labs) - set(config.LABS))
    if unknown:
        p.error(f"unknown lab(s) {unknown}; choose from {list(config.LABS)}")
    if args.hold_out:
        args.labs = [lab for lab in args.labs if lab != args.hold_out]
    if not args.labs:
        p.error("no lab left to train on")
    if args.out.suffix != ".h5":
        p.error("--out must end in .h5")
    for name in ("grey", "lowres", "restain"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} is a share of the training crops: between 0 and 1")
    if args.lowres_most < 1.5:
        p.error("--lowres-most must be at least 1.5 (the least coarse --lowres crop)")
    return args


class Progress:
    """One line per step of the whole run: elapsed time, step, and the estimated time left."""

    STEPS = ("data", "train", "export", "calibrate", "evaluate")

    def __init__(self, started: float):
        self.started = started

    def elapsed(self) -> str:
        seconds = int(time.time() - self.started)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def step(self, name: str, detail: str = "") -> None:
        k = self.STEPS.index(name) + 1
        print(f"[{self.elapsed()}] step {k}/{len(self.STEPS)}: {name}" + (f" - {detail}" if detail else ""),
              flush=True)

    def say(self, text: str) -> None:
        print(f"[{self.elapsed()}]   {text}", flush=True)


# --- 1. data -----------------------------------------------------------------------------------------------


def gather(args, cache_dir: Path, progress: Progress) -> dict:
    """{split: {lab: CropSet}} for train / validation / test."""
    from training.cropsets import load_crops

    labs_all = list(dict.fromkeys([*args.labs, *([args.hold_out] if args.hold_out else [])]))
    splits.check_data_root(args.data_root, labs_all)
    sets: dict[str, dict] = {"train": {}, "validation": {}, "test": {}}
    for split in sets:
        for lab in labs_all:
            if split == "train" and lab == args.hold_out:
                continue
            rows = splits.recipe_rows(lab, args.data_root, split, vars(args),
                                      include_unknown=lab == "lisc" and split == "test")
            crops = load_crops(rows, workers=args.workers or None, cache_dir=cache_dir, desc=f"{lab} {split}")
            sets[split][lab] = crops
            progress.say(f"{lab} {split}: {len(rows)} files, white cell found in {int(crops.found.sum())}")
    # Cells of types the model does not classify (LISC's basophils) in a training lab: not trained on, but they
    # teach the "uncertain: another type of white cell" test (train rows) and measure it (validation rows).
    sets["other_types"] = {}
    if "lisc" in args.labs and args.hold_out != "lisc":
        for split in ("train", "validation"):
            rows = splits.recipe_rows("lisc", args.data_root, split, vars(args), other_types=True)
            if len(rows):
                crops = load_crops(rows, workers=args.workers or None, cache_dir=cache_dir, desc=f"other {split}")
                sets["other_types"][split] = crops
                progress.say(f"lisc {split}, other types ({', '.join(other_type_names(rows))}): {len(rows)} files, "
                             f"white cell found in {int(crops.found.sum())}")
    if args.hold_out:
        # The held-out lab's validation rows are scored at the end, never during training: the figure that
        # compares recipes for unseen labs without looking at that lab's test rows.
        sets["held_out_validation"] = {args.hold_out: sets["validation"].pop(args.hold_out)}
    return sets


# --- 2. train ----------------------------------------------------------------------------------------------


def other_type_names(rows) -> list[str]:
    """The cell types of rows the model does not classify, from their class folders' names."""
    return sorted({Path(path).parent.name.upper() for path in rows.paths})


def detect_device() -> str:
    """'cpu', or the name of the first GPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        elif backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform == "gpu":
                return device.device_kind
    except (ImportError, RuntimeError, IndexError):
        pass
    return "cpu"


def distribution_scope(devices: int):
    """A context in which the model is built and compiled: data-parallel over `devices` devices (TensorFlow's
    MirroredStrategy over its GPUs, else over as many logical CPU devices; JAX: keras.distribution)."""
    import contextlib

    import keras

    if devices <= 1:
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            names = [f"/gpu:{i}" for i in range(min(devices, len(gpus)))]
        else:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
            names = [f"/cpu:{i}" for i in range(devices)]
        return tf.distribute.MirroredStrategy(names).scope()
    if backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext()
    raise DataError(f"--devices {devices} needs the TensorFlow or JAX backend (this is {backend})")


def batches(x_by_lab: dict, y_by_lab: dict, repeat: dict, size: int, batch_size: int, seed: int, epoch: int,
            stain: float = DEFAULTS["stain"], lowres: float = DEFAULTS["lowres"], workers: int = 1,
            grey: float = DEFAULTS["grey"], processes: bool = False, one_hot: int = 0,
            contrast: float = DEFAULTS["contrast"], restain: float = DEFAULTS["restain"],
            lowres_most: float = DEFAULTS["lowres_most"]):
    """A keras.utils.PyDataset of augmented batches: every training crop once per epoch (a lab's `repeat`
    times), shuffled, augmented in `workers` background threads while the network trains (in order: each batch's
    generator is seeded by its own index, so any number of threads gives the same batches). `processes` makes them
    worker processes: slower on the GPU machine measured (bench/bench_training_gpu.py), kept for that bench."""
    import keras

    from training.augment import augment, stain_templates

    x = np.concatenate([x_by_lab[lab] for lab in x_by_lab for _ in range(repeat.get(lab, 1))])
    y = np.concatenate([y_by_lab[lab] for lab in y_by_lab for _ in range(repeat.get(lab, 1))])
    templates = stain_templates(x) if restain else None

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=processes and workers > 1)
            self.epoch = epoch
            self.order = np.arange(len(x))
            self.on_epoch_end()

        def __len__(self):
            return len(x) // batch_size

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            rng = np.random.default_rng([seed, self.epoch, i])
            targets = np.eye(one_hot, dtype=np.float32)[y[idx]] if one_hot else y[idx]
            return augment(x[idx], size, rng, stain=stain, lowres=lowres, grey=grey, contrast=contrast,
                           restained=restain, templates=templates, lowres_most=lowres_most), targets

        def on_epoch_end(self):
            self.epoch += 1
            np.random.default_rng([seed, self.epoch]).shuffle(self.order)

    return Batches()


class EpochEnd:
    """After each epoch: validation accuracy per lab, the best weights so far, a checkpoint, a progress line."""

    def __init__(self, model, val: dict, checkpoint: Path, state: dict, progress: Progress, total_epochs: int,
                 keep_epochs: bool = False):
        self.model, self.checkpoint, self.state, self.progress = model, checkpoint, state, progress
        self.keep_epochs = keep_epochs  # every fine-tuning epoch's weights, for --average / --keep-checkpoint
        # At 224, the size the model is served at, whatever size it trains at: the epochs are compared as served.
        self.val = {lab: (c.crops, c.targets) for lab, c in val.items()}
        self.total_epochs = total_epochs
        self.epoch_started = time.time()

    def __call__(self, phase: str, epoch: int, logs: dict) -> None:
        from training.pipeline import validation_scores

        scores = validation_scores(self.model, self.val)
        mean = float(np.mean(list(scores.values()))) if scores else 0.0
        history = self.state.setdefault("history", [])
        history.append({"phase": phase, "epoch": epoch, "loss": float(logs.get("loss", 0.0)),
                        "accuracy": float(logs.get("accuracy", 0.0)), "val_accuracy": scores, "val_mean": mean,
                        "seconds": round(time.time() - self.epoch_started, 1)})
        if mean > self.state.get("best_val_mean", -1.0):
            self.state.update(best_val_mean=mean, best={"phase": phase, "epoch": epoch})
            self.model.save_weights(self.checkpoint / "best.weights.h5")
        self.model.save_weights(self.checkpoint / "last.weights.h5")
        if self.keep_epochs and phase != "head":
            self.model.save_weights(self.checkpoint / f"{phase}_{epoch}.weights.h5")
        self.state["done"] = [*self.state.get("done", []), f"{phase}:{epoch}"]
        (self.checkpoint / "state.json").write_text(json.dumps(self.state, indent=2), encoding="utf-8")
        done = len(self.state["done"])
        mean_epoch = np.mean([h["seconds"] for h in history[-3:]])
        left = (self.total_epochs - done) * mean_epoch
        figures = " ".join(f"{lab} {acc:.3f}" for lab, acc in scores.items())
        self.progress.say(f"{phase} epoch {epoch} ({done}/{self.total_epochs}): loss {logs.get('loss', 0):.3f}, "
                          f"validation {figures} | training left ~{left / 60:.1f} min")
        self.epoch_started = time.time()


def train(args, sets: dict, checkpoint: Path, state: dict, progress: Progress, device: str = "cpu"):
    """Train on the training crops; returns the 224x224 float32 model with the best validation weights. `device`
    (detect_device()'s answer) decides how many threads augment the batches."""
    import keras

    from hematovision.network import build_model, set_trainable_from

    keras.utils.set_random_seed(args.seed)
    x = {lab: c.crops for lab, c in sets["train"].items()}
    y = {lab: c.targets for lab, c in sets["train"].items()}
    repeat = {"lisc": args.lisc_repeat}
    loader = args.loader_workers or (min(16, os.cpu_count() or 1) if device != "cpu" else 1)
    classes = len(config.LABELS) if args.label_smoothing else 0  # one-hot targets only where smoothing needs them
    loss = (keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing) if classes
            else "sparse_categorical_crossentropy")
    val = sets["validation"]
    weights = None if args.weights == "none" else args.weights
    plan = [("head", args.low_size, 1, args.head_lr), ("low", args.low_size, args.epochs, args.lr),
            ("high", 224, args.high_epochs, args.high_lr)]
    total = sum(n for _, _, n, _ in plan)
    done = set(state.get("done", []))
    with distribution_scope(args.devices):
        for phase, size, epochs, lr in plan:
            if not epochs:
                continue
            # Any input size: it trains on size x size batches and is validated at 224.
            model = build_model(len(config.LABELS), weights=weights if not done else None, dropout=args.dropout,
                                image_size=(None, None), standardise=args.standardise)
            weights = None  # only the first model starts from ImageNet; later ones take the previous weights
            if (checkpoint / "last.weights.h5").is_file():
                model.load_weights(checkpoint / "last.weights.h5")
            set_trainable_from(model, None if phase == "head" else args.fine_tune_from)
            start = sum(1 for d in done if d.startswith(phase + ":"))
            if start >= epochs:
                continue
            steps_per_epoch = len(batches(x, y, repeat, size, args.batch_size, args.seed, 0))
            schedule = (keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps_per_epoch)
                        if phase == "low" else lr)
            model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss,
                          metrics=["accuracy"])
            if start:  # resumed: the schedule continues where it stopped (the Adam moments start again)
                model.optimizer.iterations.assign(start * steps_per_epoch)
            end = EpochEnd(model, val, checkpoint, state, progress, total,
                           keep_epochs=args.average > 1 or args.keep_checkpoint)
            callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs, p=phase, f=end: f(p, e + 1, logs))
            progress.say(f"{phase}: {size} px, epochs {start + 1}-{epochs}, {steps_per_epoch} steps of "
                         f"{args.batch_size}, {'head only' if phase == 'head' else 'from ' + args.fine_tune_from}")
            model.fit(batches(x, y, repeat, size, args.batch_size, args.seed, start * 1000, args.stain, args.lowres,
                              loader, args.grey, one_hot=classes, contrast=args.contrast, restain=args.restain,
                              lowres_most=args.lowres_most),
                      epochs=epochs, initial_epoch=start, callbacks=[callback], verbose=0)
            done = set(state["done"])
    # Best epoch by validation; exported at 224 in float32 whatever trained it.
    final = build_model(len(config.LABELS), weights=None, dropout=args.dropout, standardise=args.standardise)
    final.load_weights(checkpoint / "best.weights.h5")
    if args.average > 1:
        average_last_epochs(final, args.average, checkpoint, val, state, progress)
    return final


def average_last_epochs(model, n: int, checkpoint: Path, val: dict, state: dict, progress: Progress) -> None:
    """Replace `model`'s weights by the mean of the last `n` fine-tuning epochs' weights when that mean scores at
    least the best single epoch's mean validation accuracy. Batch norm is frozen (ImageNet statistics), so
    averaged weights need no new statistics. Records the comparison in state["average"]."""
    from training.pipeline import validation_scores

    names = [f"{h['phase']}_{h['epoch']}" for h in state["history"] if h["phase"] != "head"][-n:]
    best = [w.copy() for w in model.get_weights()]
    total = None
    for name in names:
        model.load_weights(checkpoint / f"{name}.weights.h5")
        weights = model.get_weights()
        total = weights if total is None else [t + w for t, w in zip(total, weights, strict=True)]
    model.set_weights([t / len(names) for t in total])
    scores = validation_scores(model, {lab: (c.crops, c.targets) for lab, c in val.items()})
    mean = float(np.mean(list(scores.values()))) if scores else 0.0
    kept = mean >= state.get("best_val_mean", -1.0)
    state["average"] = {"epochs": names, "val_accuracy": scores, "val_mean": mean, "kept": kept}
    if kept:
        state.update(best_val_mean=mean, best={"phase": "average", "epoch": names})
    else:
        model.set_weights(best)
    figures = " ".join(f"{lab} {acc:.3f}" for lab, acc in scores.items())
    progress.say(f"mean of the weights of {', '.join(names)}: validation {figures} (mean {mean:.4f}); "
                 + ("kept" if kept else "the best single epoch is kept"))


# --- the command ---------------------------------------------------------------------------------------------


def library_versions() -> dict:
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
                "backend": keras.backend.backend()}
    module = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}.get(versions["backend"])
    if module:
        versions[module] = __import__(module).__version__
    return versions


def check_weights(weights: str) -> None:
    """Fail before any work when the ImageNet weights cannot be had."""
    if weights in ("imagenet", "none"):
        if weights == "imagenet":
            cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"), "models",
                          "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
            if not cached.is_file():
                import urllib.request

                try:
                    urllib.request.urlopen("https://storage.googleapis.com", timeout=5).close()
                except OSError as exc:
                    raise DataError(f"--weights imagenet needs a download, and there is no connection; "
                                    f"{config.OFFLINE_WEIGHTS_HINT}") from exc
        return
    if not Path(weights).is_file():
        raise DataError(f"--weights file not found: {weights}; {config.OFFLINE_WEIGHTS_HINT}")


def run(args, argv) -> dict:
    started = time.time()
    progress = Progress(started)
    if args.out.exists() and not (args.force or args.resume):
        raise DataError(f"{args.out} exists; pass --force to replace it (or choose another --out)")
    check_weights(args.weights)
    checkpoint = args.out.with_name(args.out.stem + ".checkpoint")
    state: dict = {}
    if args.resume:
        if not (checkpoint / "state.json").is_file():
            raise DataError(f"nothing to resume: {checkpoint / 'state.json'} not found")
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        if state.get("settings") != settings_of(args):
            raise DataError("--resume needs the same settings as the interrupted run: "
                            f"{checkpoint / 'state.json'} has {state.get('settings')}")
        started -= state.get("seconds", 0.0)
        progress.started = started
    elif checkpoint.exists():
        shutil.rmtree(checkpoint)
    checkpoint.mkdir(parents=True, exist_ok=True)
    state["settings"] = settings_of(args)

    progress.step("data", f"labs {args.labs}" + (f", {args.hold_out} held out" if args.hold_out else ""))
    sets = gather(args, args.crop_cache or checkpoint / "crops", progress)
    for lab, crops in sets["train"].items():
        if not len(crops.targets):
            raise DataError(f"{lab}: no training image with a white cell found")

    import keras

    device = detect_device()
    progress.step("train", f"Keras {keras.__version__} ({keras.backend.backend()}) on {device}, "
                           f"{os.cpu_count()} CPU cores, {args.devices} device(s)")
    try:
        model = train(args, sets, checkpoint, state, progress, device)
    except KeyboardInterrupt:
        state["seconds"] = time.time() - started
        (checkpoint / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        raise

    progress.step("export")
    staging = Path(tempfile.mkdtemp(prefix=args.out.stem + ".", dir=args.out.parent))
    try:
        staged = staging / args.out.name
        metadata = describe(args, argv, sets, state, device)
        from training import pipeline

        pipeline.export(model, staged, metadata)
        del model
        keras.backend.clear_session()

        progress.step("calibrate", "temperature and the 'uncertain' rule, on the validation rows")
        from hematovision.classifier import load_classifier

        classifier = load_classifier(staged)
        train_parts = [pipeline.outputs(classifier, c.crops, one_view_seed=args.seed)[1]
                       for c in sets["train"].values()]
        val_outputs = {lab: pipeline.outputs(classifier, c.crops) for lab, c in sets["validation"].items()}
        fitted = pipeline.fit_calibration(
            np.concatenate(train_parts), np.concatenate([c.targets for c in sets["train"].values()]),
            np.concatenate([o[0] for o in val_outputs.values()]),
            np.concatenate([c.targets for c in sets["validation"].values()]),
            np.concatenate([o[1] for o in val_outputs.values()]),
            np.concatenate([np.full(len(c.targets), lab) for lab, c in sets["validation"].items()]),
            **other_type_features(classifier, sets["other_types"], args.seed))
        other = sets["other_types"].get("train")
        pipeline.write_calibration(staged, fitted, {
            "validation_data": ", ".join(f"{lab} validation ({len(c.targets)} crops)"
                                         for lab, c in sets["validation"].items()),
            "training_data": ", ".join(f"{lab} train ({len(c.targets)} crops)" for lab, c in sets["train"].items())
                             + f"; one random flip/quarter-turn of each (seed {args.seed})",
            "rates": "at most 0.005 of each validation lab flagged by each threshold",
            "other_data": (f"lisc train, other types ({int(other.found.sum())} crops) against the four types' "
                           "training crops" if other is not None else ""),
        })

        progress.step("evaluate", "held-out rows, through the app's classifier")
        classifier = load_classifier(staged)
        evaluation = {}
        scored = [(f"{lab}_test" + ("_held_out_lab" if lab == args.hold_out else ""), lab, c)
                  for lab, c in sets["test"].items()]
        scored += [(f"{lab}_validation_held_out_lab", lab, c) for lab, c in sets.get("held_out_validation", {}).items()]
        for name, lab, crops in scored:
            result = pipeline.assess_crops(classifier, crops, unknown_type=lab == "lisc", sources=lab == "kaggle")
            evaluation[name] = result
            progress.say(f"{name}: accuracy {result['accuracy']:.4f} (n={result['n']}), answered "
                         f"{1 - result['abstention_rate']:.1%}, right when answered {result['accuracy_answered']:.4f}")
            from training.metrics import plot_confusion

            plot_confusion(result, staging / f"{args.out.stem}_confusion_{name}.png",
                           f"{name}: accuracy {result['accuracy']:.3f} (n={result['n']})")
        plot_history(state["history"], staging / f"{args.out.stem}_curves.png")
        meta_path = staged.with_suffix(".json")
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        metadata["evaluation"] = {k: {key: v for key, v in r.items() if key != "per_source"} | (
            {"per_source_summary": {key: v for key, v in r["per_source"].items() if key != "sources"}}
            if "per_source" in r else {}) for k, r in evaluation.items()}
        metadata["training"]["wall_seconds"] = round(time.time() - started, 1)
        meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.suffix == ".h5"):  # the .h5 last
            os.replace(path, args.out.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not args.keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)
    progress.say(f"wrote {args.out} and its .json, .tflite, _ood.npz, curves and confusion matrices in "
                 f"{metadata['training']['wall_seconds'] / 60:.1f} min")
    return metadata


def other_type_features(classifier, other_sets: dict, seed: int) -> dict:
    """fit_calibration's keyword arguments for the other-type test: features of the training crops of types the
    model does not classify (one random view each, as the known training crops), and of their validation crops."""
    from training import pipeline

    if "train" not in other_sets or not other_sets["train"].found.any():
        return {}
    train = other_sets["train"]
    found = {"other_types": other_type_names(train.rows.subset(np.flatnonzero(train.found))),
             "other_train": pipeline.outputs(classifier, train.crops, one_view_seed=seed)[1]}
    if "validation" in other_sets and other_sets["validation"].found.any():
        found["other_validation"] = pipeline.outputs(classifier, other_sets["validation"].crops)[1]
    return found


def settings_of(args) -> dict:
    return {k: (v.as_posix() if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("out", "data_root", "force", "resume", "workers", "loader_workers", "crop_cache",
                         "keep_checkpoint")}


def describe(args, argv, sets: dict, state: dict, device: str) -> dict:
    """The metadata that travels with the weights."""
    if (state.get("best") or {}).get("phase") == "average":
        kept_scores = state["average"]["val_accuracy"]
    else:
        kept_scores = next((h["val_accuracy"] for h in state.get("history", [])
                            if {"phase": h["phase"], "epoch": h["epoch"]} == state.get("best")), {})
    counts = {split: {lab: {"files": len(c.rows), "cells_found": int(c.found.sum())} for lab, c in by_lab.items()}
              for split, by_lab in sets.items()}
    return {
        "name": "HematoVision MobileNetV2 white-cell classifier",
        "labels": list(config.LABELS),
        "image_size": [224, 224],
        "input": "RGB, 224x224, pixel values 0-255 (uint8 range); scaling to [-1, 1] is inside the model",
        "preprocessing": ("hematovision.imaging.prepare_field: decode, EXIF orientation, RGB, find each white cell "
                          "(hematovision.cells), one canonical 224x224 crop per cell"),
        "architecture": "MobileNetV2 alpha 1.0 (ImageNet-initialised) + global average pooling + dropout + dense",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "command": config.command_line("training/train.py", argv),
            "labs": args.labs,
            "held_out_lab": args.hold_out,
            "data": counts,
            "splits": ("Kaggle TRAIN: validation = whole source photos (training/splits/kaggle_train_sources.csv, "
                       f"fraction {args.val_fraction}, seed {args.seed}), at most {args.kaggle_per_photo} copies "
                       "per photo" + (f" (in training, about {args.kaggle_per_class} files per class, as many "
                                      "copies of each photo)" if args.kaggle_per_class else "")
                       + "; PBC: training/splits/pbc_split.csv; LISC: by cell_id, 60/20/20 per class, "
                       f"seed {args.seed}. Test rows were never used for a choice."),
            "chosen_on": ("the epoch with the best mean validation accuracy over the training labs"
                          + (f", or the mean of the last {args.average} epochs' weights where that scores at "
                             "least as well" if args.average > 1 else "")),
            "base_weights": Path(args.weights).name,
            "settings": settings_of(args),
            "history": state.get("history", []),
            "best_epoch": state.get("best"),
            "average": state.get("average"),
            "device": device,
            "cpu_count": os.cpu_count(),
        },
        "versions": library_versions(),
        "validation": {"mean_accuracy": state.get("best_val_mean"),
                       "by_lab": kept_scores},
        "evaluation": {},
    }


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x, [h["loss"] for h in history], label="training loss (augmented)")
    axes[0].set_title("loss")
    for lab in history[-1]["val_accuracy"]:
        axes[1].plot(x, [h["val_accuracy"].get(lab, np.nan) for h in history], label=f"validation {lab}")
    axes[1].set_title("validation accuracy")
    for ax in axes:
        for i, h in enumerate(history[1:], start=1):
            if h["phase"] != history[i - 1]["phase"]:
                ax.axvline(i + 0.5, color="grey", linestyle="--")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args, argv)
    except DataError as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same command and --resume "
              f"(checkpoint: {args.out.with_name(args.out.stem + '.checkpoint')})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
