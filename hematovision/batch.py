"""Classify every white cell of one image or of many, and summarise them as a differential count (free of Flask).

One pipeline for the result page, the batch page, the API and the command line: bytes -> hematovision.imaging's
prepare_field (decode, find the white cells, one canonical crop each) -> Classifier.assess on the crops -> one
ItemResult per file with a CellResult per cell. Files are handled one at a time, so a batch never holds more than
one full-size decoded image, nor more than one image's crops, in memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hematovision.abstention import REASON_SHORT, REASONS
from hematovision.imaging import DEFAULT_MAX_PIXELS, Field, ImageRejected, prepare_field

DEFAULT_UNCERTAIN_BELOW = None  # None: the model's fitted low-confidence threshold (0.6 for a model without one)
DEFAULT_MAX_BATCH_FILES = 32
# White cells classified per image at most: bounds the work of one request. A field holding more (a thick smear, a
# low magnification) gets the ones nearest its centre, and the answer says how many were found.
MAX_CELLS_PER_IMAGE = 100

NO_WHITE_CELL = "no_white_cell_found"  # the `reason` of an image in which no white cell was found
NO_WHITE_CELL_TEXT = "No white blood cell found in this image"

# Usual adult share of each type among white cells, in percent. Laboratories differ slightly; these are
# the ranges quoted on the page next to the count, for orientation only.
REFERENCE_RANGES: dict[str, tuple[float, float]] = {
    "NEUTROPHIL": (40.0, 60.0),
    "LYMPHOCYTE": (20.0, 40.0),
    "MONOCYTE": (2.0, 8.0),
    "EOSINOPHIL": (1.0, 4.0),
}


@dataclass
class CellResult:
    """One white cell of an image and the model's answer for it."""

    number: int  # 1, 2, ...: as numbered on the image, in reading order (batch.reading_order)
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in the image's pixels (after EXIF orientation)
    probabilities: dict[str, float]
    label: str
    uncertain: bool = False
    reason: str | None = None  # why it is uncertain: a reason of hematovision.abstention (e.g. LOW_CONFIDENCE)
    field_index: int | None = None  # its index in the Field it came from: its crop is that Field's crops[field_index]

    @property
    def probability(self) -> float:
        return self.probabilities[self.label]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def reason_short(self) -> str:
        return REASON_SHORT.get(self.reason, "uncertain") if self.uncertain else ""

    @property
    def reason_text(self) -> str:
        return REASONS.get(self.reason, "") if self.uncertain else ""


@dataclass
class ItemResult:
    """One file: the white cells found in it with an answer each, or the reason the file was refused.

    The image-level `label`, `probabilities`, `uncertain` and `reason` are the primary cell's (the one nearest the
    image centre); an image without a white cell is uncertain with the reason NO_WHITE_CELL and no label."""

    filename: str
    cells: list[CellResult] = field(default_factory=list)
    primary: int | None = None  # index in `cells`
    cells_found: int = 0  # white cells found; more than len(cells) when MAX_CELLS_PER_IMAGE capped them
    size: tuple[int, int] | None = None  # (width, height) of the decoded image
    error: ImageRejected | None = None
    thumbnail: Image.Image | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def no_cell(self) -> bool:
        return self.ok and not self.cells

    @property
    def capped(self) -> bool:
        return self.cells_found > len(self.cells)

    @property
    def primary_cell(self) -> CellResult | None:
        return None if self.primary is None else self.cells[self.primary]

    @property
    def label(self) -> str | None:
        cell = self.primary_cell
        return cell.label if cell else None

    @property
    def probabilities(self) -> dict[str, float]:
        cell = self.primary_cell
        return cell.probabilities if cell else {}

    @property
    def probability(self) -> float:
        cell = self.primary_cell
        return cell.probability if cell else 0.0

    @property
    def uncertain(self) -> bool:
        cell = self.primary_cell
        return cell.uncertain if cell else self.ok

    @property
    def reason(self) -> str | None:
        cell = self.primary_cell
        if cell is not None:
            return cell.reason
        return NO_WHITE_CELL if self.ok else None


def classify_field(
    classifier,
    prepared: Field,
    filename: str = "",
    *,
    uncertain_below: float | None = DEFAULT_UNCERTAIN_BELOW,
    max_cells: int = MAX_CELLS_PER_IMAGE,
) -> ItemResult:
    """The white cells of one prepared image (hematovision.imaging.Field), each classified: one model call for
    all its crops. At most `max_cells` are classified: those nearest the image centre (the primary cell first)."""
    width, height = prepared.image.size
    result = ItemResult(filename=filename, cells_found=len(prepared.cells), size=(width, height))
    if not prepared.cells:
        return result
    keep = reading_order(prepared.cells, nearest_centre(prepared.cells, (width, height), max_cells))
    assessment = classifier.assess(prepared.crops[keep], min_probability=uncertain_below)
    labels = classifier.labels
    for number, (index, row, reason) in enumerate(
        zip(keep, assessment.probabilities, assessment.reasons, strict=True), start=1
    ):
        result.cells.append(
            CellResult(
                number=number,
                box=tuple(int(v) for v in prepared.cells[index].box),
                probabilities={label: float(p) for label, p in zip(labels, row, strict=True)},
                label=labels[int(np.argmax(row))],
                uncertain=reason is not None,
                reason=reason,
                field_index=index,
            )
        )
        if index == prepared.primary:
            result.primary = number - 1
    return result


def nearest_centre(cells, size: tuple[int, int], limit: int) -> list[int]:
    """Indices of at most `limit` cells (anything with a box and a `centre`): all of them when they are few
    enough, else those whose box centre is nearest the centre of an image of `size` (width, height)."""
    if len(cells) <= limit:
        return list(range(len(cells)))
    cx, cy = size[0] / 2, size[1] / 2
    ranked = sorted(range(len(cells)), key=lambda i: (cells[i].centre[0] - cx) ** 2 + (cells[i].centre[1] - cy) ** 2)
    return sorted(ranked[:limit])


def reading_order(cells, indices: list[int]) -> list[int]:
    """These cell indices as a person reads the field: in rows, top to bottom, each row left to right. A cell whose
    centre lies less than half a typical cell's height below the first cell of a row belongs to that row, so two
    cells side by side are numbered left to right even when the right one sits a little higher."""
    if len(indices) < 2:
        return list(indices)
    heights = sorted(cells[i].box[3] - cells[i].box[1] for i in indices)
    tolerance = heights[len(heights) // 2] / 2
    rows: list[list[int]] = []
    for i in sorted(indices, key=lambda i: cells[i].centre[1]):
        if rows and cells[i].centre[1] - cells[rows[-1][0]].centre[1] < tolerance:
            rows[-1].append(i)
        else:
            rows.append([i])
    return [i for row in rows for i in sorted(row, key=lambda i: cells[i].centre[0])]


def classify_file(
    classifier,
    filename: str,
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    uncertain_below: float | None = DEFAULT_UNCERTAIN_BELOW,
    max_cells: int = MAX_CELLS_PER_IMAGE,
    thumbnail_side: int | None = None,
) -> ItemResult:
    """One file's bytes -> its ItemResult; a file that is not a usable image gets its ImageRejected in `error`."""
    try:
        prepared = prepare_field(data, max_pixels=max_pixels)
    except ImageRejected as exc:
        return ItemResult(filename=filename, error=exc)
    result = classify_field(classifier, prepared, filename, uncertain_below=uncertain_below, max_cells=max_cells)
    if thumbnail_side:
        prepared.image.thumbnail((thumbnail_side, thumbnail_side))  # in place: the full image is not kept
        result.thumbnail = prepared.image
    return result


def classify_files(
    classifier,
    files: Sequence[tuple[str, bytes]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    uncertain_below: float | None = DEFAULT_UNCERTAIN_BELOW,
    max_cells: int = MAX_CELLS_PER_IMAGE,
    thumbnail_side: int | None = None,
) -> list[ItemResult]:
    """(filename, bytes) pairs -> one ItemResult each, in the same order. A file that is not a usable image gets
    its ImageRejected in `error` instead of failing the others. A cell is uncertain by the classifier's abstention
    rule; `uncertain_below` replaces its low-confidence threshold (None keeps the fitted one)."""
    return [
        classify_file(classifier, filename, data, max_pixels=max_pixels, uncertain_below=uncertain_below,
                      max_cells=max_cells, thumbnail_side=thumbnail_side)
        for filename, data in files
    ]


# --- the differential count --------------------------------------------------------------------------


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
    counted: int  # white cells with a confident answer: the denominator of every percent
    cells: int  # white cells classified, confident or not
    uncertain: list[tuple[ItemResult, CellResult]]  # cells answered "uncertain", with their image
    no_cell: list[ItemResult]  # images in which no white cell was found
    rejected: list[ItemResult]  # files that are not usable images


def count_differential(results: Iterable[ItemResult], labels: Sequence[str]) -> Differential:
    """Number and percent of each class over the confidently classified white cells of all the images; uncertain
    cells, images without a white cell and refused files are listed apart and not counted, so that they cannot skew
    the percentages."""
    results = list(results)
    cells = [(r, cell) for r in results if r.ok for cell in r.cells]
    certain = [cell for _, cell in cells if not cell.uncertain]
    rows = []
    for label in labels:
        count = sum(1 for cell in certain if cell.label == label)
        percent = 100.0 * count / len(certain) if certain else 0.0
        rows.append(CountRow(label, count, percent, REFERENCE_RANGES.get(label)))
    return Differential(
        rows=rows,
        counted=len(certain),
        cells=len(cells),
        uncertain=[(r, cell) for r, cell in cells if cell.uncertain],
        no_cell=[r for r in results if r.no_cell],
        rejected=[r for r in results if not r.ok],
    )


# --- CSV ---------------------------------------------------------------------------------------------


def csv_header(labels: Sequence[str]) -> list[str]:
    return ["file", "cell", "xmin", "ymin", "xmax", "ymax", "label", "probability", "uncertain", "reason",
            *labels, "error"]


def csv_rows(result: ItemResult, labels: Sequence[str]) -> Iterator[list[str]]:
    """The CSV rows of one file: one per white cell with its box (pixels of the image after EXIF orientation),
    its class, that class's probability, the uncertain flag and its reason, and every class's probability. An image
    without a white cell gets one row that says so; a refused file one row with the refusal message."""
    name = _defuse(result.filename)
    blanks = ["" for _ in labels]
    if not result.ok:
        yield [name, "", "", "", "", "", "", "", "", "", *blanks, result.error.message]
        return
    if not result.cells:
        yield [name, "", "", "", "", "", "", "", "yes", "no white cell found", *blanks, ""]
        return
    for cell in result.cells:
        yield [
            name,
            str(cell.number),
            *(str(v) for v in cell.box),
            cell.label,
            f"{cell.probability:.4f}",
            "yes" if cell.uncertain else "no",
            cell.reason_short,
            *(f"{cell.probabilities[label]:.4f}" for label in labels),
            "",
        ]


def write_csv(results: Iterable[ItemResult], labels: Sequence[str]) -> str:
    """The CSV of these results as text: csv_header, then csv_rows of each file."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(csv_header(labels))
    for result in results:
        writer.writerows(csv_rows(result, labels))
    return buffer.getvalue()


def _defuse(text: str) -> str:
    """Filenames are user input; a leading = + - @ would make a spreadsheet run it as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
