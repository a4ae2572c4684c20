"""Pages beside the upload form: the model card with its figures, and the sample images.

Views stay thin: a sample's result is the same page as an upload's (hematovision.web). The model card reads the
metadata that travels with the model (training/train.py's describe(), evaluate and adapt add to it) through
model_card(), which turns whatever parts are there into plain figures; a part that is missing is left out, never
an error.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

from flask import Blueprint, abort, current_app, render_template, request, send_from_directory
from PIL import Image

from hematovision import web
from hematovision.classifier import public_metadata
from hematovision.imaging import decode_image

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "static" / "samples"
# One image per class, shipped in static/samples; the form can only name one of these.
SAMPLES = {
    "eosinophil": "eosinophil.jpeg",
    "lymphocyte": "lymphocyte.jpeg",
    "monocyte": "monocyte.jpeg",
    "neutrophil": "neutrophil.jpeg",
}

# The labs whose images trained and tested the model, as a lab calls them, and where their images come from.
LABS = {
    "kaggle": ("Kaggle", 'Kaggle "Blood Cell Images" (the BCCD smear photos, augmented copies)'),
    "pbc": ("PBC", "PBC: Hospital Clinic Barcelona, CellaVision DM96 analyser"),
    "lisc": ("LISC", "LISC: microscope photos of another lab, with another stain and camera"),
}
# Test sets with a name of their own: the Kaggle set's folders are called TEST and TEST_SIMPLE.
SET_NAMES = {"kaggle_test": "Kaggle TEST", "kaggle_test_simple": "Kaggle TEST_SIMPLE"}
HELD_OUT_SUFFIX = "_held_out_lab"
LEAVE_ONE_LAB_OUT_FILE = "leave_one_lab_out.json"  # beside the model (training/experiments/lolo_table.py)
# Settings that say nothing to a lab, or only the training machine's paths.
HIDDEN_SETTINGS = {"weights", "data_root", "out", "workers", "devices"}

bp = Blueprint("pages", __name__)


# --- views -------------------------------------------------------------------------------------------


@bp.get("/model")
def model_card():
    classifier = web.get_classifier()
    meta = public_metadata(classifier.metadata)
    return render_template(
        "model.html",
        meta=meta,
        card=describe_model(meta, classifier.labels, read_leave_one_lab_out(classifier.path)),
        labels=classifier.labels,
        figures=[(name, describe_figure(name), figure_size(classifier.path.parent / name))
                 for name in list_model_figures(classifier.path, meta)],
        model_file=classifier.path.name,
        uncertain_below=classifier.min_probability(web.uncertain_below()),
        temperature=classifier.temperature,
        temperature_slope=classifier.calibration.slope,
        distance_rule=classifier.rule.tests_distance,
        other_types=list(classifier.rule.other.types) if classifier.rule.tests_other else [],
        bands=web.probability_bands(),
        min_cells_to_compare=web.MIN_CELLS_TO_COMPARE,
    )


@bp.get("/model/files/<name>")
def model_file(name: str):
    classifier = web.get_classifier()
    if name not in list_model_figures(classifier.path, classifier.metadata):  # an allow-list, never a request's path
        abort(404)
    return send_from_directory(classifier.path.parent, name, mimetype="image/png", max_age=3600)


@bp.post("/predict/sample")
def predict_sample():
    filename = SAMPLES.get(request.form.get("name", ""))
    if filename is None:
        return web.render_home("Unknown sample. Please choose one of the sample images.", 400)
    image = decode_image((SAMPLES_DIR / filename).read_bytes(), max_pixels=current_app.config["MAX_IMAGE_PIXELS"])
    return web.render_prediction(image, f"Sample: {filename}", explain=True)


@bp.app_context_processor
def offer_samples():
    """The home page's sample buttons; only the samples whose file is really there."""
    return {"samples": [(name, filename) for name, filename in SAMPLES.items() if (SAMPLES_DIR / filename).is_file()]}


# --- helpers -----------------------------------------------------------------------------------------


def list_model_figures(model_path: Path, metadata: dict | None = None) -> list[str]:
    """The PNG figures of this model, beside it: `<stem>_*.png` (its training curves, its confusion matrices), or an
    older model's `confusion_<set>.png` for a test set in its metadata; the curves first, then the test sets in the
    metadata's order. Figures of other models in the same folder are not listed."""
    folder, stem = Path(model_path).parent, Path(model_path).stem
    own = sorted(path.name for path in folder.glob(f"{stem}_*.png") if path.is_file())
    sets = list(_dict(_dict(metadata).get("evaluation")))
    figures = [name for name in own if "_confusion_" not in name]
    for name in sets:
        for candidate in (f"{stem}_confusion_{name}.png", f"confusion_{name}.png"):
            if (folder / candidate).is_file():
                figures.append(candidate)
                break
    return figures + [name for name in own if name not in figures]


def figure_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the PNG's header, so that the page keeps the figure's place while it loads."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def describe_figure(name: str) -> str:
    """Alt text and caption for a figure, from the names training/ gives them: `<stem>_curves.png`,
    `<stem>_confusion_<set>.png` (or an older model's `confusion_<set>.png`)."""
    stem = name.rsplit(".", 1)[0]
    if stem.endswith("_curves"):
        return "Training: loss and validation accuracy of each lab, epoch by epoch"
    if "_confusion_" in stem or stem.startswith("confusion_"):
        test_set = stem.split("confusion_", 1)[1]
        return f"Confusion matrix, {set_name(test_set)}: true type by row, the model's answer by column"
    return stem.replace("_", " ")


def lab_name(lab: str) -> str:
    return LABS.get(lab, (lab.upper(),))[0]


def set_name(key: str) -> str:
    """A test set's key in the metadata as a lab would say it: kaggle_test -> 'Kaggle TEST', pbc_test -> 'PBC test',
    lisc_test_held_out_lab -> 'LISC test (a lab it never saw)'."""
    held_out = key.endswith(HELD_OUT_SUFFIX)
    key = key.removesuffix(HELD_OUT_SUFFIX)
    if key in SET_NAMES:
        name = SET_NAMES[key]
    elif key.endswith("_test") or key.endswith("_validation"):
        lab, _, part = key.rpartition("_")
        name = f"{lab_name(lab)} {part}"
    else:
        name = key.replace("_", " ")
    return name + (" (a lab it never saw)" if held_out else "")


def read_leave_one_lab_out(model_path: Path) -> dict | None:
    """model/leave_one_lab_out.json beside the model, if there is one and it can be read."""
    path = Path(model_path).parent / LEAVE_ONE_LAB_OUT_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) else None


# --- the model card's figures, from whatever the metadata holds ------------------------------------------------


def describe_model(meta: dict, labels: list[str], leave_one_lab_out: dict | None = None) -> dict:
    """The model card's content as plain values: test sets, per-type recall, the leave-one-lab-out table, the
    training facts and the adaptation. Every part is optional; missing or malformed parts give None or []."""
    training = _dict(meta.get("training"))
    evaluation = _dict(meta.get("evaluation"))
    adaptation = _dict(meta.get("adaptation"))
    if not evaluation and adaptation:  # an adapted model: the base model's figures, said to be the base's
        evaluation = _dict(adaptation.get("base_evaluation"))
    sets = [row for key, value in evaluation.items() if (row := _test_set(key, value))]
    return {
        "created": human_date(meta.get("created")),
        "labs": [lab_name(lab) for lab in _list(training.get("labs"))],
        "lab_sources": [LABS[lab][1] for lab in _list(training.get("labs")) if lab in LABS],
        "held_out_lab": lab_name(training["held_out_lab"]) if isinstance(training.get("held_out_lab"), str) else None,
        "sets": sets,
        "sets_from_base": bool(sets) and not _dict(meta.get("evaluation")),
        "recall": _recall_table(evaluation, labels),
        "leave_one_lab_out": _leave_one_lab_out(leave_one_lab_out),
        "validation": _validation(meta.get("validation")),
        "training": _training(training),
        "adaptation": _adaptation(adaptation, labels) if adaptation else None,
        "versions": [(str(k), str(v)) for k, v in _dict(meta.get("versions")).items()],
    }


def human_date(value) -> str | None:
    """An ISO timestamp as a person writes the day: '2026-11-26T05:39:16+00:00' -> '26 November 2026'."""
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return f"{when.day} {when:%B %Y}"


def human_duration(seconds) -> str | None:
    """Seconds as minutes (or hours and minutes): 426 -> '7 minutes', 4000 -> '1 hour 7 minutes'."""
    seconds = _number(seconds)
    if seconds is None:
        return None
    minutes = max(1, round(seconds / 60))
    if minutes < 60:
        return f"{minutes} minute{'' if minutes == 1 else 's'}"
    hours, minutes = divmod(minutes, 60)
    text = f"{hours} hour{'' if hours == 1 else 's'}"
    return text + (f" {minutes} minute{'' if minutes == 1 else 's'}" if minutes else "")


def human_device(device, cpu_count=None) -> str | None:
    """'cpu' -> 'a CPU (2 cores)'; a GPU's name as it is."""
    if not isinstance(device, str) or not device:
        return None
    if device.lower() == "cpu":
        cores = _number(cpu_count)
        return "a CPU" + (f" ({cores:.0f} cores)" if cores else "")
    return device


def _test_set(key: str, value) -> dict | None:
    ev = _dict(value)
    accuracy = _number(ev.get("accuracy"))
    if accuracy is None:
        return None
    rate = _number(ev.get("abstention_rate"))
    unknown = _dict(ev.get("unknown_type"))
    ci = _list(ev.get("accuracy_ci95"))
    return {
        "key": key,
        "name": set_name(key),
        "held_out": key.endswith(HELD_OUT_SUFFIX),
        "n": _number(ev.get("n")),
        "accuracy": accuracy,
        "ci": (ci[0], ci[1]) if len(ci) == 2 and all(_number(v) is not None for v in ci) else None,
        "answered": None if rate is None else 1 - rate,
        "accuracy_answered": _number(ev.get("accuracy_answered")) if rate is not None else None,
        "no_white_cell_found": _number(ev.get("no_white_cell_found")),
        "unknown_type": ({"n": _number(unknown.get("n")), "flagged": _number(unknown.get("flagged")),
                          "rate": _number(unknown.get("flag_rate"))} if _number(unknown.get("n")) else None),
    }


def _recall_table(evaluation: dict, labels: list[str]) -> dict | None:
    """{"sets": [name...], "rows": [(label, [recall or None per set])]}: how often a cell of each type is given its
    type, per test set."""
    columns = [(set_name(key), _dict(_dict(value).get("per_class"))) for key, value in evaluation.items()]
    columns = [(name, per_class) for name, per_class in columns if per_class]
    if not columns:
        return None
    rows = [(label, [_number(_dict(per_class.get(label)).get("recall")) for _, per_class in columns])
            for label in labels]
    return {"sets": [name for name, _ in columns], "rows": rows}


def _leave_one_lab_out(table: dict | None) -> list[dict]:
    """One row per lab: the figures of a model trained without that lab, beside the shipped model's."""
    if not table:
        return []
    held_out, shipped = _dict(table.get("held_out")), _dict(table.get("shipped"))
    rows = []
    for lab in sorted(held_out, key=lambda lab: list(LABS).index(lab) if lab in LABS else len(LABS)):
        figures = _dict(held_out[lab])
        if _number(figures.get("accuracy")) is None:
            continue
        rows.append({"lab": lab_name(lab),
                     "trained_on": [lab_name(other) for other in _list(figures.get("trained_on"))],
                     "never_seen": _figures(figures), "all_labs": _figures(_dict(shipped.get(lab)))})
    return rows


def _figures(figures: dict) -> dict | None:
    accuracy = _number(figures.get("accuracy"))
    if accuracy is None:
        return None
    return {"accuracy": accuracy, "answered": _number(figures.get("answered")),
            "accuracy_answered": _number(figures.get("accuracy_answered")), "n": _number(figures.get("n"))}


def _validation(value) -> dict | None:
    validation = _dict(value)
    mean = _number(validation.get("mean_accuracy"))
    if mean is None:
        mean = _number(validation.get("accuracy"))
    by_lab = _dict(validation.get("by_lab")) or _dict(validation.get("by_domain"))
    labs = [(lab_name(lab), acc) for lab, acc in by_lab.items() if _number(acc) is not None]
    return {"mean": mean, "by_lab": labs} if mean is not None or labs else None


def _training(training: dict) -> dict:
    data = _dict(training.get("data"))
    counts: dict[str, dict[str, float]] = {}  # lab -> split -> white cells found (else files)
    for split in ("train", "validation", "test"):
        for lab, figures in _dict(data.get(split)).items():
            found = _number(_dict(figures).get("cells_found"))
            files = _number(_dict(figures).get("files"))
            counts.setdefault(lab, {})[split] = found if found is not None else files
    history = []
    for entry in _list(training.get("history")):
        entry = _dict(entry)
        if not entry:
            continue
        history.append({"phase": str(entry.get("phase", "")), "epoch": entry.get("epoch"),
                        "loss": _number(entry.get("loss")), "accuracy": _number(entry.get("accuracy")),
                        "val": {lab_name(lab): _number(acc) for lab, acc in _dict(entry.get("val_accuracy")).items()},
                        "val_mean": _number(entry.get("val_mean")), "seconds": _number(entry.get("seconds"))})
    best = _dict(training.get("best_epoch"))
    settings = [(str(k).replace("_", " "), _setting(v)) for k, v in _dict(training.get("settings")).items()
                if k not in HIDDEN_SETTINGS]
    return {
        "data": [(lab_name(lab), splits) for lab, splits in counts.items()],
        "splits": training.get("splits") if isinstance(training.get("splits"), str) else None,
        "chosen_on": training.get("chosen_on") if isinstance(training.get("chosen_on"), str) else None,
        "base_weights": training.get("base_weights") if isinstance(training.get("base_weights"), str) else None,
        "time": human_duration(training.get("wall_seconds", training.get("seconds"))),
        "device": human_device(training.get("device"), training.get("cpu_count")),
        "epochs": len(history) or None,
        "best": ({"phase": str(best.get("phase", "")), "epoch": best.get("epoch"), "text": _kept(best)}
                 if best else None),
        "history": history,
        "history_labs": list(dict.fromkeys(lab for entry in history for lab in entry["val"])),
        "settings": settings,
        "command": training.get("command") if isinstance(training.get("command"), str) else None,
    }


def _kept(best: dict) -> str | None:
    """Which weights a training run kept, in words: 'high phase, epoch 1', or for averaged weights (train.py
    --average) 'the mean of the weights of low 8, high 1 and high 2'."""
    epoch = best.get("epoch")
    if best.get("phase") == "average" and isinstance(epoch, list) and epoch:
        names = [str(name).replace("_", " ") for name in epoch]
        return "the mean of the weights of " + (", ".join(names[:-1]) + " and " if len(names) > 1 else "") + names[-1]
    if epoch is None or isinstance(epoch, (list, dict)):
        return None
    return f"{str(best.get('phase', '')).replace('_', ' ')} phase, epoch {epoch}"


def _adaptation(adaptation: dict, labels: list[str]) -> dict:
    per_class = {str(k): v for k, v in _dict(adaptation.get("images_per_class")).items() if _number(v) is not None}
    counts = [int(v) for v in per_class.values()]
    figures = _dict(adaptation.get("figures"))
    ci = _list(figures.get("accuracy_ci95"))
    base = adaptation.get("base_name") or adaptation.get("base_model")
    return {
        "base": str(base) if base else "the shipped model",
        "base_file": adaptation.get("base_model") if isinstance(adaptation.get("base_model"), str) else None,
        "per_class": [(label, per_class[label]) for label in labels if label in per_class]
                     + [(k, v) for k, v in per_class.items() if k not in labels],
        "images": sum(counts) if counts else None,
        "fewest": min(counts) if counts else None,
        "most": max(counts) if counts else None,
        "unlabelled": _number(adaptation.get("unlabelled_images")),
        "when": human_date(adaptation.get("created")),
        "method": adaptation.get("method") if isinstance(adaptation.get("method"), str) else None,
        "data": adaptation.get("data") if isinstance(adaptation.get("data"), str) else None,
        "accuracy": _number(figures.get("accuracy")),
        "ci": (ci[0], ci[1]) if len(ci) == 2 and all(_number(v) is not None for v in ci) else None,
        "n": _number(figures.get("n")),
        "before_fine_tune": bool(_number(_dict(adaptation.get("settings")).get("fine_tune_steps"))),
        "time": human_duration(adaptation.get("seconds")),
        "command": adaptation.get("command") if isinstance(adaptation.get("command"), str) else None,
    }


def _setting(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "none"}[value]
    if isinstance(value, (list, tuple)):
        return ", ".join(lab_name(v) if isinstance(v, str) and v in LABS else str(v) for v in value) or "none"
    if value == "":
        return "none"
    return str(value)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value
