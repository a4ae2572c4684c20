"""Unit tests of hematovision.imaging: every accepted input becomes the same kind of model input,
and every bad one is refused with the right HTTP status, bombs before any decoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from hematovision.imaging import ImageRejected, decode_image, prepare_bytes


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims the given size but holds no pixel data: decoding it could only fail."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def assert_rejected(data: bytes, status: int, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        prepare_bytes(data, **kwargs)
    assert caught.value.status == status
    assert str(caught.value)  # a message a person can read
    return caught.value


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Make any pixel decoding fail loudly, to prove a refusal came from the header alone."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "LA"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("PNG", "1"),
        ("PNG", "I;16"),
        ("BMP", "RGB"),
        ("BMP", "P"),
        ("TIFF", "RGB"),
        ("TIFF", "CMYK"),
        ("TIFF", "I"),
        ("TIFF", "F"),
    ],
)
def test_every_mode_becomes_rgb_uint8_model_input(make_image, fmt, mode):
    data = encode(Image.new(mode, (64, 48), 1000), fmt) if mode in ("I", "F") else make_image(fmt, mode, (64, 48))
    array = prepare_bytes(data)
    assert array.shape == (224, 224, 3)
    assert array.dtype == np.uint8


def test_sixteen_bit_values_are_rescaled_not_clipped():
    image = Image.fromarray(np.full((40, 60), 32768, dtype=np.uint16))
    assert image.mode == "I;16"
    array = prepare_bytes(encode(image, "PNG"))
    assert abs(int(array.min()) - 128) <= 1 and abs(int(array.max()) - 128) <= 1


def test_transparent_pixels_become_white():
    data = encode(Image.new("RGBA", (50, 40), (255, 0, 0, 0)), "PNG")
    assert (prepare_bytes(data) == 255).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (320, 240), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 60, 60))  # a red mark in the top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    assert decoded.size == (240, 320)
    red, _, blue = decoded.getpixel((decoded.width - 20, 20))  # the mark is now top-right
    assert red > 200 and blue < 60


def test_header_claiming_too_many_pixels_is_refused_before_decoding(forbid_decoding):
    error = assert_rejected(png_header_only(8000, 8000), 413)
    assert "8000 x 8000" in error.message


def test_huge_pixel_bomb_is_refused_before_decoding(forbid_decoding):
    assert_rejected(png_header_only(20000, 20000), 413)


def test_real_many_pixel_image_is_refused_before_decoding():
    data = encode(Image.new("1", (8000, 6000)), "PNG")  # 48 MP in a few KB
    assert len(data) < 100_000
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
        assert_rejected(data, 413)


def test_pixel_limit_is_configurable(make_image):
    assert_rejected(make_image("PNG", size=(20, 20)), 413, max_pixels=100)
    assert prepare_bytes(make_image("PNG", size=(10, 10)), max_pixels=100).shape == (224, 224, 3)


def test_truncated_jpeg_is_refused(make_image):
    data = make_image("JPEG", size=(320, 240))
    assert_rejected(data[: len(data) // 2], 400)


def test_empty_file_is_refused():
    assert_rejected(b"", 400)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_unsupported_image_formats_are_refused(make_image, fmt):
    error = assert_rejected(make_image(fmt, size=(32, 32)), 415)
    assert "not supported" in error.message


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(4096),
        b"hello, this is just text\n" * 10,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>',
    ],
    ids=["random-bytes", "text", "svg"],
)
def test_non_images_are_refused(data):
    assert_rejected(data, 415)


def test_multi_frame_tiff_is_refused():
    pages = [Image.new("RGB", (32, 32), color) for color in ("red", "green")]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert_rejected(data, 400)


def test_one_pixel_image_is_accepted():
    array = prepare_bytes(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert array.shape == (224, 224, 3)
    assert tuple(array[100, 100]) == (10, 20, 30)


def test_very_elongated_image_is_accepted():
    data = encode(Image.new("RGB", (10000, 10), (200, 100, 50)), "PNG")
    assert decode_image(data).size == (10000, 10)
    assert prepare_bytes(data).shape == (224, 224, 3)
