"""Mutation fuzzer for the upload path: valid image bytes, mutated, fed to decode + predict and to POST /predict.

    python bench/fuzz_decode.py --minutes 2           # what CI-side checks run
    python bench/fuzz_decode.py --minutes 10 --seed 7

Seeds: JPEG (baseline, progressive, CMYK, EXIF), PNG (RGB, RGBA, 16-bit, palette), BMP, TIFF (raw,
deflate, LZW) and the hostile corpus. Mutations: bit flips, random bytes, chunk insertion / deletion /
duplication, truncation, overwriting size fields with extreme values, and splicing two files. Every input must
either become a model input with finite probabilities that sum to 1, or be refused with ImageRejected (a
4xx status); through the Flask client it must never get a 5xx or show a traceback. A failing input is saved
under bench/results/fuzz_failures/ and the run exits 1. Results: bench/results/fuzz_decode.json.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

FAILURES = _common.RESULTS / "fuzz_failures"
MAX_PIXELS = 4_000_000  # lower than the app's 40 MP so that mutated sizes stay quick to decode


def seed_images() -> list[bytes]:
    base = Image.linear_gradient("L").resize((96, 72))
    rgb = Image.merge("RGB", (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", base.size, 90)))

    def enc(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [
        enc(rgb, "JPEG", quality=75),
        enc(rgb, "JPEG", quality=75, progressive=True),
        enc(rgb.convert("CMYK"), "JPEG"),
        enc(rgb, "JPEG", exif=exif),
        enc(rgb, "PNG"),
        enc(rgb.convert("RGBA"), "PNG"),
        enc(Image.fromarray(np.asarray(base, dtype=np.uint16) * 257), "PNG"),
        enc(rgb.convert("P"), "PNG"),
        enc(rgb, "BMP"),
        enc(rgb, "TIFF"),
        enc(rgb, "TIFF", compression="tiff_deflate"),
        enc(rgb, "TIFF", compression="tiff_lzw"),
        enc(rgb.convert("L"), "TIFF"),
    ]
    hostile = _common.ROOT / "tests" / "data" / "hostile"
    image_suffixes = {".jpg", ".png", ".gif", ".tiff"}
    seeds += [path.read_bytes() for path in sorted(hostile.iterdir()) if path.suffix in image_suffixes]
    seeds += [path.read_bytes() for path in sorted(_common.SAMPLES.glob("*/*.jpeg"))[:2]]
    return [seed for seed in seeds if seed]


EXTREMES = [b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x80\x00", b"\x00\x01", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"]


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> tuple[bytes, str]:
    buf = bytearray(data)
    kinds = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        kind = rng.choice(("flip", "byte", "insert", "delete", "dup", "truncate", "extreme", "splice", "header"))
        kinds.append(kind)
        n = len(buf)
        if n == 0:
            buf += bytes(rng.randrange(256) for _ in range(8))
            continue
        i = rng.randrange(n)
        if kind == "flip":
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            buf[i] = rng.randrange(256)
        elif kind == "insert":
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif kind == "delete":
            del buf[i : i + rng.randrange(1, 64)]
        elif kind == "dup":
            j = rng.randrange(n)
            buf[i:i] = buf[j : j + rng.randrange(1, 256)]
        elif kind == "truncate":
            del buf[max(1, i) :]
        elif kind == "extreme":
            value = rng.choice(EXTREMES)
            buf[i : i + len(value)] = value
        elif kind == "splice":
            other = rng.choice(seeds)
            j = rng.randrange(len(other))
            buf[i:] = other[j:]
        elif kind == "header":  # the first 64 bytes hold most size and format fields
            k = rng.randrange(min(n, 64))
            buf[k] = rng.randrange(256)
    return bytes(buf), "+".join(kinds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, default=_common.ROOT / "model" / "blood_cell_model.h5")
    parser.add_argument("--web-every", type=int, default=4, help="send every Nth input through the Flask client too")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)

    from app import create_app
    from hematovision.imaging import ImageRejected, prepare_bytes

    app = create_app({"MODEL_PATH": str(args.model), "MAX_IMAGE_PIXELS": MAX_PIXELS})
    classifier = app.extensions["hematovision"]
    client = app.test_client()
    match = _common.TOKEN_RE.search(client.get("/").get_data(as_text=True))
    token = {"csrf_token": match.group(1)} if match else {}

    rng = random.Random(args.seed)
    seeds = seed_images()
    outcomes, statuses, failures = Counter(), Counter(), []
    deadline = time.monotonic() + args.minutes * 60
    count = 0
    slowest = (0.0, "")
    while time.monotonic() < deadline:
        count += 1
        data, how = mutate(rng.choice(seeds), rng, seeds)
        started = time.perf_counter()
        try:
            array = prepare_bytes(data, max_pixels=MAX_PIXELS)
            probabilities = classifier.predict(array[None])[0]
            if not (np.all(np.isfinite(probabilities)) and abs(float(probabilities.sum()) - 1.0) < 1e-3):
                raise AssertionError(f"bad probabilities {probabilities}")
            outcomes["classified"] += 1
        except ImageRejected as exc:
            outcomes[f"refused {exc.status}"] += 1
        except Exception as exc:  # a crash: anything but a clean refusal
            failures.append(save_failure(count, data, how, "decode+predict", traceback.format_exc()))
            outcomes[f"CRASH {type(exc).__name__}"] += 1
        elapsed = time.perf_counter() - started
        slowest = max(slowest, (elapsed, how))
        if count % args.web_every == 0:
            response = client.post(
                "/predict", data={**token, "file": (io.BytesIO(data), "fuzz.jpg")}, content_type="multipart/form-data"
            )
            statuses[response.status_code] += 1
            body = response.get_data(as_text=True)
            if response.status_code >= 500 or "Traceback" in body:
                failures.append(save_failure(count, data, how, f"POST /predict {response.status_code}", body[-2000:]))

    result = {
        "environment": _common.environment(),
        "label": args.label,
        "minutes": args.minutes,
        "seed": args.seed,
        "inputs": count,
        "inputs_per_s": round(count / (args.minutes * 60), 1),
        "outcomes": dict(outcomes.most_common()),
        "web_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "slowest_input_s": round(slowest[0], 3),
        "slowest_mutation": slowest[1],
    }
    path = _common.write_results("fuzz_decode", result)
    print(f"{count} inputs in {args.minutes} min; outcomes {dict(outcomes.most_common())}")
    print(f"POST /predict statuses {result['web_statuses']}; slowest input {result['slowest_input_s']} s")
    print(f"failures: {len(failures)}" + (f" (saved in {FAILURES.relative_to(_common.ROOT)})" if failures else ""))
    print(f"wrote {path.relative_to(_common.ROOT)}")
    return 1 if failures else 0


def save_failure(index: int, data: bytes, how: str, where: str, details: str) -> dict:
    FAILURES.mkdir(parents=True, exist_ok=True)
    path = FAILURES / f"input_{index:07d}.bin"
    path.write_bytes(data)
    print(f"FAILURE #{index} ({where}, {how}): {details.strip().splitlines()[-1][:200]}", flush=True)
    return {"file": str(path.relative_to(_common.ROOT)), "where": where, "mutation": how, "details": details[-1500:]}


if __name__ == "__main__":
    sys.exit(main())
