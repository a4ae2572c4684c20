"""Write the hostile-upload corpus next to this script, and its manifest.json.

    python tests/data/hostile/make_corpus.py

Every file is small (the corpus stays well under 300 KB) and made here from nothing, so the corpus can be
re-created and reviewed. manifest.json lists, for each case: the file to send (null: send no file part), the
filename given in the multipart request (never a path on disk), the form field, and the status and a fragment
of the message that POST /predict must answer with. Over-the-byte-cap and too-many-files uploads are made in
tests/test_hostile.py itself: they are big by nature.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
NOT_READABLE = "not an image we can read"
DAMAGED = "damaged or incomplete"


def cell(size=(64, 48), mode="RGB") -> Image.Image:
    """A small smooth picture (compresses well), in the mode asked for."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bomb(width: int, height: int, rows: int = 2000) -> bytes:
    """A 1-bit grayscale PNG header claiming width x height; only the first `rows` rows of (zero) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" + b"\0" * ((width + 7) // 8)
    idat = zlib.compress(row * rows, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_js_polyglot() -> bytes:
    """Valid GIF (a 1x1 image on a 10799x10 screen) and valid JavaScript: `GIF89a/*...*/=alert(1);`."""
    header = b"GIF89a" + b"/*" + struct.pack("<H", 10) + b"\x80\x00\x00"  # screen width bytes are "/*"
    palette = b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return header + palette + image + b"\x3b" + b"*/=alert(1);"


def jpeg_html_polyglot() -> bytes:
    """A valid JPEG that is also an HTML page: markup in a comment segment and after the end marker."""
    html = b"<html><body><script>alert('polyglot')</script></body></html>"
    return encode(cell(), "JPEG", quality=80, comment=html) + html


def animated_gif() -> bytes:
    frames = [cell().rotate(angle) for angle in (0, 90, 180)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    pages = [cell(), cell().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: stored 64x48, shown 48x64
    return encode(cell(), "JPEG", quality=80, exif=exif)


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def rgba_png() -> bytes:
    image = cell(mode="RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return encode(image, "PNG")


# Found by bench/fuzz_decode.py (a mutated two-page TIFF): counting its pages raised TypeError, a 500 before the fix.
FUZZ_TIFF_MISSING_DIMENSIONS = (
    "SUkqAAgAAAAJAAABBAABAAAAYAAAAAEBBAABAAAASAAAAAIBAwABAAAACAAAAAMBAwABAAAAAQAAAAYBAwABAAAAAQAAABEBBAAB"
    "AAAAegAAABYBBAABAAAASAAAABcBBAABAAAAABsAABwBAwABAAAAAQAAAAAAAJFUKSXRIUIoHZbCITJYkoGzHK9Ev/1IO7Qfqa8a"
    "JaqX/DoRyhJPWkI9jA0YAMLKWY2dlRDY1QVC/a8AHRYgBRZgwJgdHHfMBhPU24ZJr1DqkoIKCk2qrPoLkAFWCAmD9XIzXjtPqycg"
    "OIZrAGIaSOnGVLulqkqR1Uw5U5bLGUmW5NAJJRwNRwPr5RMIiLOhevux45gOtw3zxiyhfiMAVdQzEtelEymSjqSjIQLAYE39sTtm"
    "AfexQ2FCBQKmWrmpUD/FhLLMAjL6kTApBNbr9Wr9BIJLbdcx6aDNp9JFu4s2Ti1VlauSLMv0pSNyVIpGwlFeYe0u3bW7Q6DennQm"
    "JvpdrFCpqpUqTaaG6zO1FCMieIFoFCdKBuv15glt9wmf2yYC32+aFbNb6ZpVX6Fay9Rkf06AiLACAVysgLg8E3YgBqZqYgEhAH84"
    "VGVmYAGZ7/cNXIq7YUBn0hEL+ATER8hVVDP/MQBEADb/M+i45qRjdkSd+93qzoEEGIE6AMJg+7Sebp7+uO7UdT3X7U3cnjmxTMvE"
    "qdxWuvVqRasislaVFRyZzmlEjstRJRong+2GCFt34/mEznPHmjChSwSti36VCJmakmFCBISTeCQejcYD2/V2utl6G2+KNmK5z72J"
    "1YGCZdYtU7OqdRbQMiDI2UtZUXBOYjCIn8QJwIQpdvA8JvQmPdOjFSyrW7+t3Na7WkUDoQaAUsuijsROYycxKNAK2+1mO/0z9bZ4"
    "BDBMz7M803ruCYdblE3qa1ntMnOZlZVLBXOiRE4hIAymW2+NeN4fj8Zy/bZl1W8tzbqtazy1rKZkL5UsGcSUOBLDjwAYjyKm9+z1"
    "iMCjQUHbzSXV+X5FOVVip3GeANepjy1onnsU69kniNBAQFMus9wnAzzDqQ8QAqLfI4fe3/quTQJa1q+zAenH4n9XeN+9gDCwen1B"
    "6LMAvwLqHEXJKf4jiBXepx8vRHjxPrwZ8tp7vbNeLatPqd9eaY3bhsZRGspXtNHPnX5GDuK5+EHgffu+/fOCzKZUv/PunhHrjuv3"
    "VoPC/RwTvmeJ8FnJofw5fgAA+jOc7WwnwIS+L3CPNLQrQUBdGOSUbzGEBOKB9/f37csHMnuZ0dy9zvrPd/3XPua+f3V/dd+4b/Bk"
    "Uf/+Nfc9h/n8DTnAxGmFDzzDVNyP4An6r73+vyvU/RUaDTgIgdxpjhRiIMDg5X1Geflggz4cen1/rvqNfuP+ShjkwEBYIHdAOfjG"
    "AAz6H/4Ks9c7igDc0wp+nwRyX3P+0Aa8xD8KgHxEaSYygQAAAABJRU5ErkJggg=="
)


FILES: dict[str, bytes] = {
    "empty.jpg": b"",
    "truncated.jpg": encode(cell((160, 120)), "JPEG", quality=90)[:1500],
    "bomb_20000x20000.png": png_bomb(20000, 20000),
    "svg_named.jpg": (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b"<script>alert(1)</script><rect width='64' height='48' fill='red'/></svg>"
    ),
    "html_named.jpg": b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>",
    "polyglot_gif_js.jpg": gif_js_polyglot(),
    "polyglot_jpeg_html.jpg": jpeg_html_polyglot(),
    "animated.gif": animated_gif(),
    "multipage.tiff": multipage_tiff(),
    "cmyk.jpg": encode(cell(mode="CMYK"), "JPEG", quality=80),
    "gray16.png": sixteen_bit_png(),
    "rgba.png": rgba_png(),
    "grayscale.jpg": encode(cell(mode="L"), "JPEG", quality=80),
    "palette.png": encode(cell(mode="P"), "PNG"),
    "exif_rotated.jpg": exif_rotated_jpeg(),
    "one_pixel.png": encode(cell((1, 1)), "PNG"),
    "wide_10000x10.png": encode(cell((10000, 10)), "PNG", optimize=True),
    "webp.jpg": encode(cell(), "WEBP", quality=50),
    "random_bytes.jpg": np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
    "plain.jpg": encode(cell(), "JPEG", quality=80),
    "fuzz_tiff_missing_dimensions.tiff": base64.b64decode("".join(FUZZ_TIFF_MISSING_DIMENSIONS)),
}

# Answered: a result page (a white cell's class, or "No white blood cell found in this image": these small drawn
# pictures hold no real cell, and whether the detector sees one in a gradient is not what this corpus tests).
OK = {"status": 200, "message": "Prediction Result"}
CASES = [
    {"file": "empty.jpg", "status": 400, "message": "The file is empty"},
    {"file": "truncated.jpg", "status": 400, "message": DAMAGED},
    {"file": "bomb_20000x20000.png", "status": 413, "message": "too many pixels"},
    {"file": "svg_named.jpg", "status": 415, "message": NOT_READABLE},
    {"file": "html_named.jpg", "status": 415, "message": NOT_READABLE},
    {"file": "polyglot_gif_js.jpg", "status": 415, "message": "GIF images are not supported"},
    {"file": "polyglot_jpeg_html.jpg", **OK, "absent": "alert('polyglot')"},
    {"file": "animated.gif", "status": 415, "message": "GIF images are not supported"},
    {"file": "multipage.tiff", "status": 400, "message": "several images"},
    {"file": "cmyk.jpg", **OK},
    {"file": "gray16.png", **OK},
    {"file": "rgba.png", **OK},
    {"file": "grayscale.jpg", **OK},
    {"file": "palette.png", **OK},
    {"file": "exif_rotated.jpg", **OK, "shown_size": [48, 64]},
    {"file": "one_pixel.png", **OK},
    {"file": "wide_10000x10.png", **OK},
    {"file": "webp.jpg", "status": 415, "message": "WEBP images are not supported"},
    {"file": "random_bytes.jpg", "status": 415, "message": NOT_READABLE},
    {"file": "fuzz_tiff_missing_dimensions.tiff", "status": 400, "message": DAMAGED},
    {"file": "plain.jpg", "upload_name": "../../../etc/passwd.jpg", **OK},
    {"file": "plain.jpg", "upload_name": "..\\..\\windows\\win.ini.jpg", **OK},
    {"file": "plain.jpg", "upload_name": "血液 细胞 🩸 é\u202egpj.exe", **OK},
    # A browser sends a quote in a filename as %22 (HTML spec); a raw quote ends the multipart parameter early.
    {"file": "plain.jpg", "upload_name": "%22><img src=x onerror=alert(1)>.jpg", **OK, "absent": "<img src=x"},
    {"file": "plain.jpg", "upload_name": '"><img src=x onerror=alert(1)>.jpg', "status": 400,
     "message": "No file was selected", "absent": "<img src=x"},
    {"file": "plain.jpg", "upload_name": "x" * 300 + ".jpg", **OK},
    {"file": "plain.jpg", "field": "image", "status": 400, "message": "No file was sent"},
    {"file": None, "status": 400, "message": "No file was sent"},
]


def main() -> None:
    for name, data in FILES.items():
        (HERE / name).write_bytes(data)
    manifest = {
        "about": "Hostile uploads for POST /predict; made by make_corpus.py. file null: no file part is sent.",
        "cases": [{"upload_name": case["file"], "field": "file", **case} for case in CASES],
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    total = sum(len(data) for data in FILES.values())
    print(f"wrote {len(FILES)} files ({total / 1024:.0f} KB) and manifest.json with {len(CASES)} cases")


if __name__ == "__main__":
    main()
