"""The command line, for a lab with thousands of images: `python -m hematovision classify PATH... [--csv OUT]`.

The same pipeline as the app (hematovision.batch: prepare_field, then Classifier.assess on each white cell's crop),
one image at a time with a progress bar; a CSV row per cell (the batch page's columns); the differential count over
all cells at the end. A file that cannot be read is listed with its reason and the run goes on. A mistake in the
command (no such path, no images, an existing --csv without --force, no model) ends it at once with one line.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from hematovision.batch import (
    DEFAULT_UNCERTAIN_BELOW,
    MAX_CELLS_PER_IMAGE,
    ItemResult,
    classify_file,
    count_differential,
    csv_header,
    csv_rows,
)
from hematovision.classifier import ModelLoadError, load_classifier
from hematovision.imaging import DEFAULT_MAX_PIXELS, ImageRejected

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model" / "blood_cell_model.h5"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


class UsageError(Exception):
    """A mistake in the command: reported in one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return classify(args)
    except UsageError as exc:
        print(f"hematovision: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hematovision: interrupted; no CSV was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hematovision",
                                     description="White blood cells in microscope images: find, classify, count.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "classify",
        help="find and classify every white cell in images and folders",
        description="Find every white blood cell in the images (folders are searched recursively for .jpg, .jpeg, "
        ".png, .bmp, .tif and .tiff files), classify each, and print the differential count over all of them.",
    )
    run.add_argument("paths", nargs="+", metavar="PATH", type=Path, help="image files or folders")
    run.add_argument("--csv", type=Path, metavar="OUT", help="write one row per white cell to this CSV file")
    run.add_argument("--force", action="store_true", help="overwrite the --csv file if it exists")
    run.add_argument("--model", type=Path, default=DEFAULT_MODEL, metavar="M.h5",
                     help="the model (its .json metadata next to it); default: model/blood_cell_model.h5")
    run.add_argument("--uncertain-below", type=float, default=DEFAULT_UNCERTAIN_BELOW, metavar="P",
                     help="answer 'uncertain' when a cell's top probability is below P (default: the model's own)")
    run.add_argument("--max-cells", type=int, default=MAX_CELLS_PER_IMAGE, metavar="N",
                     help=f"classify at most N white cells per image, those nearest its centre (default "
                     f"{MAX_CELLS_PER_IMAGE})")
    return parser


def find_images(paths: Iterable[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (recursively, sorted); each once."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return list(dict.fromkeys(found))


def classify(args: argparse.Namespace) -> int:
    images = find_images(args.paths)
    if not images:
        raise UsageError("no images found in " + ", ".join(str(p) for p in args.paths)
                         + f" (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if args.csv is not None:
        if args.csv.is_dir():
            raise UsageError(f"{args.csv} is a folder; give the CSV file's name")
        if args.csv.exists() and not args.force:
            raise UsageError(f"{args.csv} exists; add --force to overwrite it")
        if not args.csv.parent.is_dir():
            raise UsageError(f"no such folder for the CSV: {args.csv.parent}")
    if args.max_cells < 1:
        raise UsageError("--max-cells must be at least 1")

    try:
        classifier = load_classifier(args.model, pool_size=1)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None

    out = open_csv(args.csv) if args.csv is not None else None
    results: list[ItemResult] = []
    try:
        writer = csv.writer(out, lineterminator="\r\n") if out else None
        if writer:
            writer.writerow(csv_header(classifier.labels))
        for path in tqdm(images, unit="image", file=sys.stderr, disable=None, dynamic_ncols=True):
            result = classify_path(classifier, path, args)
            if not result.ok:
                tqdm.write(f"skipped {path}: {result.error.message}", file=sys.stderr)
            elif not writer:
                print_cells(result)
            if writer:
                writer.writerows(csv_rows(result, classifier.labels))
            results.append(result)
        if out:
            out.close()
            umask = os.umask(0)  # a temporary file is private (0600); the CSV gets a new file's usual mode
            os.umask(umask)
            os.chmod(out.name, 0o666 & ~umask)
            os.replace(out.name, args.csv)
    except BaseException:
        if out:
            out.close()
            Path(out.name).unlink(missing_ok=True)
        raise
    print_summary(results, classifier.labels, args.csv, args.max_cells)
    return 0


def open_csv(target: Path):
    """A temporary file next to `target`, renamed onto it only when the run is complete: never a half-written CSV."""
    return tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=target.parent,
                                       prefix=f".{target.name}.", suffix=".part", delete=False)


def classify_path(classifier, path: Path, args: argparse.Namespace) -> ItemResult:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ItemResult(filename=str(path), error=ImageRejected(400, f"cannot be read ({exc.strerror or exc})."))
    return classify_file(classifier, str(path), data, max_pixels=DEFAULT_MAX_PIXELS,
                         uncertain_below=args.uncertain_below, max_cells=args.max_cells)


def print_cells(result: ItemResult) -> None:
    """Without --csv: one line per white cell (or one saying there is none), above the progress bar."""
    if not result.cells:
        tqdm.write(f"{result.filename}: no white blood cell found")
        return
    for cell in result.cells:
        answer = f"{cell.label} {cell.probability:.1%}"
        if cell.uncertain:
            answer = f"uncertain ({cell.reason_short}; forced choice {answer})"
        box = ",".join(str(v) for v in cell.box)
        tqdm.write(f"{result.filename}: cell {cell.number} at [{box}]: {answer}")


def print_summary(results: list[ItemResult], labels: Sequence[str], csv_path: Path | None, max_cells: int) -> None:
    differential = count_differential(results, labels)
    read = sum(r.ok for r in results)
    print(f"\n{read} of {plural(len(results), 'file')} read: {plural(differential.cells, 'white cell')} found, "
          f"{plural(len(differential.no_cell), 'image')} without one.")
    capped = [r for r in results if r.capped]
    if capped:
        print(f"{plural(len(capped), 'image')} held more than {max_cells} white cells; the {max_cells} nearest the "
              "centre of each were classified.")
    print(f"\nDifferential count over the {plural(differential.counted, 'cell')} classified with confidence "
          f"({len(differential.uncertain)} uncertain, not counted):")
    width = max(len(label) for label in labels)
    for row in differential.rows:
        print(f"  {row.label:<{width}}  {row.count:>6}  {row.percent:5.1f}%")
    if differential.rejected:
        print(f"\n{plural(len(differential.rejected), 'file')} could not be read:")
        for r in differential.rejected:
            print(f"  {r.filename}: {r.error.message}")
    if csv_path is not None:
        print(f"\nOne row per white cell written to {csv_path}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
