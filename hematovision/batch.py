"""Classify many images in one model call, and summarise them as a differential count (free of Flask).

Each file is decoded and shrunk to the model input one at a time, so a batch never holds more than one full-size
decoded image in memory; the model then runs once on the stacked (N, 224, 224, 3) batch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hematovision.abstention import REASON_SHORT, REASONS
from hematovision.imaging import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, to_model_input

DEFAULT_UNCERTAIN_BELOW = None  # None: the model's fitted low-confidence threshold (0.6 for a model without one)
DEFAULT_MAX_BATCH_FILES = 32

# Usual adult share of each type among white cells, in percent. Laboratories differ slightly; these are
# the ranges quoted on the page next to the count, for orientation only.
REFERENCE_RANGES: dict[str, tuple[float, float]] = {
    "NEUTROPHIL": (40.0, 60.0),
    "LYMPHOCYTE": (20.0, 40.0),
    "MONOCYTE": (2.0, 8.0),
    "EOSINOPHIL": (1.0, 4.0),
}


@dataclass
class ItemResult:
    """One file of a batch: either a prediction or the reason it was refused."""

    filename: str
    probabilities: dict[str, float] = field(default_factory=dict)
    label: str | None = None
    uncertain: bool = False
    error: ImageRejected | None = None
    thumbnail: Image.Image | None = None
    reason: str | None = None  # why it is uncertain: hematovision.abstention.LOW_CONFIDENCE or UNLIKE_TRAINING

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reason_short(self) -> str:
        return REASON_SHORT.get(self.reason, "uncertain") if self.uncertain else ""

    @property
    def reason_text(self) -> str:
        return REASONS.get(self.reason, "") if self.uncertain else ""

    @property
    def probability(self) -> float:
        return self.probabilities[self.label] if self.label else 0.0


@dataclass
class CountRow:
    label: str
    count: int
    percent: float
    reference: tuple[float, float] | None

    @property
    def flag(self) -> str:
        """'low', 'high' or '' (within range, or no reference range for this class)."""
        if self.reference is None:
            return ""
        low, high = self.reference
        if self.percent < low:
            return "low"
        if self.percent > high:
            return "high"
        return ""


@dataclass
class Differential:
    rows: list[CountRow]
    counted: int  # images with a confident prediction: the denominator of every percent
    uncertain: list[ItemResult]
    rejected: list[ItemResult]


def classify_files(
    classifier,
    files: Sequence[tuple[str, bytes]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    uncertain_below: float | None = DEFAULT_UNCERTAIN_BELOW,
    thumbnail_side: int | None = None,
) -> list[ItemResult]:
    """(filename, bytes) pairs -> one ItemResult each, in the same order. A file that is not a usable image
    gets its ImageRejected in `error` instead of failing the others. The model runs once for the batch.
    An image is uncertain by the classifier's abstention rule; `uncertain_below` replaces its low-confidence
    threshold (None keeps the fitted one)."""
    results: list[ItemResult] = []
    inputs: list[np.ndarray] = []
    for filename, data in files:
        result = ItemResult(filename=filename)
        try:
            image = decode_image(data, max_pixels=max_pixels)
        except ImageRejected as exc:
            result.error = exc
        else:
            inputs.append(to_model_input(image))
            if thumbnail_side:
                image.thumbnail((thumbnail_side, thumbnail_side))  # in place: the full image is not kept
                result.thumbnail = image
        results.append(result)

    if inputs:
        labels = classifier.labels
        assessment = classifier.assess(np.stack(inputs), min_probability=uncertain_below)
        good = (result for result in results if result.ok)
        for result, row, reason in zip(good, assessment.probabilities, assessment.reasons, strict=True):
            result.probabilities = {label: float(p) for label, p in zip(labels, row, strict=True)}
            result.label = labels[int(np.argmax(row))]
            result.uncertain = reason is not None
            result.reason = reason
    return results


def count_differential(results: Iterable[ItemResult], labels: Sequence[str]) -> Differential:
    """Number and percent of each class over the confident predictions; uncertain and refused files are
    listed apart and not counted, so that they cannot skew the percentages."""
    results = list(results)
    certain = [r for r in results if r.ok and not r.uncertain]
    uncertain = [r for r in results if r.ok and r.uncertain]
    rejected = [r for r in results if not r.ok]
    rows = []
    for label in labels:
        count = sum(1 for r in certain if r.label == label)
        percent = 100.0 * count / len(certain) if certain else 0.0
        rows.append(CountRow(label, count, percent, REFERENCE_RANGES.get(label)))
    return Differential(rows=rows, counted=len(certain), uncertain=uncertain, rejected=rejected)


def write_csv(results: Iterable[ItemResult], labels: Sequence[str]) -> str:
    """One row per file: filename, predicted class, its probability, the uncertain flag and its reason, every
    class's probability, and the refusal message for a file that was not classified."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["filename", "label", "probability", "uncertain", "reason", *labels, "error"])
    for r in results:
        if r.ok:
            writer.writerow(
                [
                    _defuse(r.filename),
                    r.label,
                    f"{r.probability:.4f}",
                    "yes" if r.uncertain else "no",
                    r.reason_short,
                    *(f"{r.probabilities[label]:.4f}" for label in labels),
                    "",
                ]
            )
        else:
            writer.writerow([_defuse(r.filename), "", "", "", "", *("" for _ in labels), r.error.message])
    return buffer.getvalue()


def _defuse(text: str) -> str:
    """Filenames are user input; a leading = + - @ would make a spreadsheet run it as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
