"""The one image path shared by training, evaluation and the web app.

bytes -> checked header -> decoded RGB (EXIF orientation applied) -> every white cell found
(hematovision.cells) -> one canonical 224x224 uint8 crop per cell. Pixel scaling is *not* done here: it lives
inside the model (a Rescaling layer).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hematovision.cells import Cell, canonical_crop, primary_index, survey

IMAGE_SIZE = (224, 224)
ACCEPTED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF", "MPO": "JPEG"}
DEFAULT_MAX_PIXELS = 40_000_000  # a 40 MP photo decodes to ~120 MB; bigger is a bomb, not a smear
RESAMPLE = Image.Resampling.BILINEAR
# What Pillow's decoders raise on malformed data besides OSError: found by bench/fuzz_decode.py (e.g. a damaged
# TIFF gives TypeError "Missing dimensions" or SyntaxError "unknown pixel mode" when its frames are counted).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError, struct.error)
DAMAGED_MESSAGE = "The image is damaged or incomplete and could not be decoded."


@dataclass
class ImageRejected(ValueError):
    """A file that is not a usable image; carries the HTTP status a server should answer with."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an RGB Pillow image, or raise ImageRejected."""
    if not data:
        raise ImageRejected(400, "The file is empty.")
    image = _open_checked(data, max_pixels)
    try:
        with warnings.catch_warnings():
            # Oversized images were refused from the header already; Pillow's own bomb warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # corrupt-metadata notes
            image.load()
            # In place: without an orientation tag, the default (a copy) costs more than the decode itself.
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
    except (*DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise ImageRejected(400, DAMAGED_MESSAGE) from exc


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and check format, frames and pixel count before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, _too_many_pixels_message(max_pixels)) from exc
    except (UnidentifiedImageError, *DECODE_ERRORS) as exc:
        raise ImageRejected(
            415, "This file is not an image we can read. Please upload a JPEG, PNG, BMP or TIFF image."
        ) from exc
    if image.format not in ACCEPTED_FORMATS:
        raise ImageRejected(
            415, f"{image.format} images are not supported. Please upload a JPEG, PNG, BMP or TIFF image."
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(400, "The image has no pixels.")
    if width * height > max_pixels:
        raise ImageRejected(413, _too_many_pixels_message(max_pixels, width, height))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            frames = getattr(image, "n_frames", 1)  # TIFF reads every page's header here
    except DECODE_ERRORS as exc:
        raise ImageRejected(400, DAMAGED_MESSAGE) from exc
    if frames > 1 and image.format != "MPO":
        raise ImageRejected(400, "The file holds several images (pages or frames). Please upload a single image.")
    return image


def _too_many_pixels_message(max_pixels: int, width: int | None = None, height: int | None = None) -> str:
    size = f" ({width} x {height})" if width else ""
    return f"The image has too many pixels{size}. The limit is {max_pixels / 1e6:.0f} megapixels."


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and float data are rescaled, not clipped; alpha goes on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_model_input(image: Image.Image) -> np.ndarray:
    """RGB image -> (224, 224, 3) uint8 array, the model's input (no scaling: that is in the model)."""
    if image.mode != "RGB":
        image = to_rgb(image)
    if image.size != IMAGE_SIZE:
        image = image.resize(IMAGE_SIZE, RESAMPLE)
    return np.asarray(image, dtype=np.uint8)


def prepare_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of an uploaded or stored file -> model input array. Serving and training both call this."""
    return to_model_input(decode_image(data, max_pixels=max_pixels))


def prepare_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file on disk -> model input array, through exactly the same steps as an upload."""
    return prepare_bytes(Path(path).read_bytes(), max_pixels=max_pixels)


@dataclass
class Field:
    """A decoded image and the white cells found in it: boxes in the image's pixels (after EXIF orientation),
    the canonical crop of each (the model's input), and which one is the primary cell (nearest the centre)."""

    image: Image.Image
    cells: list[Cell]
    crops: np.ndarray  # (len(cells), 224, 224, 3) uint8
    primary: int | None

    @property
    def primary_crop(self) -> np.ndarray | None:
        return None if self.primary is None else self.crops[self.primary]


def field_from_image(image: Image.Image) -> Field:
    rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    cells, background = survey(rgb)  # the slide's colour is computed once per image, for all its crops
    crops = (np.stack([canonical_crop(rgb, cell, IMAGE_SIZE[0], background, cells) for cell in cells]) if cells
             else np.zeros((0, *IMAGE_SIZE, 3), np.uint8))
    return Field(image=image, cells=cells, crops=crops, primary=primary_index(cells, rgb.shape))


def prepare_field(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Field:
    """Bytes of an uploaded or stored file -> its white cells and their model inputs. Serving, training and
    evaluation all call this."""
    return field_from_image(decode_image(data, max_pixels=max_pixels))


def primary_crop_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A labelled file on disk -> the model input of its primary cell (None when no white cell is found),
    through exactly the same steps as an upload."""
    return prepare_field(Path(path).read_bytes(), max_pixels=max_pixels).primary_crop
