"""Mutation fuzzer for the upload path: valid image bytes, mutated, fed to decode + predict and to POST /predict.

    python bench/fuzz_decode.py --minutes 2           # what CI-side checks run
    python bench/fuzz_decode.py --minutes 10 --seed 7 --label "10 min"   # the long unattended run

Seeds: JPEG (baseline, progressive, CMYK, EXIF), PNG (RGB, RGBA, 16-bit, palette), BMP, TIFF (raw,
deflate, LZW) and the hostile corpus. Mutations: bit flips, random bytes, chunk insertion / deletion /
duplication, truncation, overwriting size fields with extreme values, and splicing two files. Every input must
either become a model input with finite probabilities that sum to 1, or be refused with ImageRejected (a
4xx status); through the Flask client it must never get a 5xx or show a traceback. A failing input is saved
under bench/results/fuzz_failures/ (the first 50; all are counted) and the run exits 1.

Results: bench/results/fuzz_decode.json (--out): inputs tried, outcomes, crashes (exceptions other than a clean
refusal), 5xx answers and tracebacks from POST /predict, the slowest input. It is rewritten every 30 s while the
run goes on ("finished": false), so a run that is killed or dies still leaves its figures; a fatal error in native
code also prints the Python stack (faulthandler), and an input stuck for over 60 s is saved as
fuzz_failures/stuck_input.bin for inspection.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import random
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import _common  # bench/: the script's own folder
import numpy as np
from PIL import Image

FAILURES = _common.RESULTS / "fuzz_failures"
MAX_PIXELS = 4_000_000  # lower than the app's 40 MP so that mutated sizes stay quick to decode
MAX_SAVED_FAILURES = 50  # failing inputs written to disk; all are counted
CHECKPOINT_EVERY_S = 30.0
STUCK_AFTER_S = 60.0


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
    parser.add_argument("--out", default="fuzz_decode", help="results name under bench/results/ (default fuzz_decode)")
    args = parser.parse_args(argv)
    faulthandler.enable()

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
    counts = {"crashes": 0, "web_5xx": 0, "web_tracebacks": 0, "failures": 0}
    began = time.monotonic()
    deadline = began + args.minutes * 60
    count = 0
    slowest = (0.0, "")
    current = {"index": 0, "data": b"", "how": "", "since": began}  # what the loop is on, for the watchdog
    done = threading.Event()

    def summary(finished: bool) -> dict:
        elapsed = time.monotonic() - began
        return {
            "environment": _common.environment(),
            "label": args.label,
            "minutes": args.minutes,
            "elapsed_s": round(elapsed, 1),
            "finished": finished,
            "seed": args.seed,
            "inputs": count,
            "inputs_per_s": round(count / elapsed, 1) if elapsed else 0.0,
            "crashes": counts["crashes"],
            "web_5xx": counts["web_5xx"],
            "web_tracebacks": counts["web_tracebacks"],
            "failure_count": counts["failures"],
            "outcomes": dict(outcomes.most_common()),
            "web_statuses": {str(k): v for k, v in sorted(statuses.items())},
            "failures": failures,
            "slowest_input_s": round(slowest[0], 3),
            "slowest_mutation": slowest[1],
        }

    def watchdog() -> None:
        saved = None
        while not done.wait(5.0):
            index = current["index"]
            if index != saved and time.monotonic() - current["since"] > STUCK_AFTER_S:
                FAILURES.mkdir(parents=True, exist_ok=True)
                (FAILURES / "stuck_input.bin").write_bytes(current["data"])
                print(f"STUCK on input #{index} ({current['how']}) for over {STUCK_AFTER_S:.0f} s; saved as "
                      f"{(FAILURES / 'stuck_input.bin').relative_to(_common.ROOT)}", flush=True)
                saved = index

    threading.Thread(target=watchdog, daemon=True).start()
    next_checkpoint = began + CHECKPOINT_EVERY_S
    finished = False
    try:
        while time.monotonic() < deadline:
            count += 1
            data, how = mutate(rng.choice(seeds), rng, seeds)
            current.update(index=count, data=data, how=how, since=time.monotonic())
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
                counts["crashes"] += 1
                counts["failures"] += 1
                failures.append(save_failure(count, data, how, "decode+predict", traceback.format_exc(),
                                             keep=counts["failures"] <= MAX_SAVED_FAILURES))
                outcomes[f"CRASH {type(exc).__name__}"] += 1
            elapsed = time.perf_counter() - started
            slowest = max(slowest, (elapsed, how))
            if count % args.web_every == 0:
                response = client.post(
                    "/predict", data={**token, "file": (io.BytesIO(data), "fuzz.jpg")},
                    content_type="multipart/form-data",
                )
                statuses[response.status_code] += 1
                body = response.get_data(as_text=True)
                server_error, shown = response.status_code >= 500, "Traceback" in body
                if server_error or shown:
                    counts["web_5xx"] += server_error
                    counts["web_tracebacks"] += shown
                    counts["failures"] += 1
                    failures.append(save_failure(count, data, how, f"POST /predict {response.status_code}",
                                                 body[-2000:], keep=counts["failures"] <= MAX_SAVED_FAILURES))
            if time.monotonic() >= next_checkpoint:
                _common.write_results(args.out, summary(finished=False))
                next_checkpoint += CHECKPOINT_EVERY_S
        finished = True
    finally:
        done.set()
        result = summary(finished)
        path = _common.write_results(args.out, result)
    print(f"{count} inputs in {result['elapsed_s']:.0f} s; outcomes {dict(outcomes.most_common())}")
    print(f"POST /predict statuses {result['web_statuses']}; slowest input {result['slowest_input_s']} s")
    print(f"crashes: {counts['crashes']}, 5xx: {counts['web_5xx']}, tracebacks shown: {counts['web_tracebacks']}"
          + (f" (failing inputs in {FAILURES.relative_to(_common.ROOT)})" if failures else ""))
    print(f"wrote {path.relative_to(_common.ROOT)}")
    return 1 if counts["failures"] else 0


def save_failure(index: int, data: bytes, how: str, where: str, details: str, keep: bool = True) -> dict:
    """Print and describe a failing input; write it to fuzz_failures/ when `keep` (the first MAX_SAVED_FAILURES)."""
    last_line = (details.strip().splitlines() or [""])[-1][:200]
    print(f"FAILURE #{index} ({where}, {how}): {last_line}", flush=True)
    entry = {"file": None, "where": where, "mutation": how, "details": details[-1500:]}
    if keep:
        FAILURES.mkdir(parents=True, exist_ok=True)
        path = FAILURES / f"input_{index:07d}.bin"
        path.write_bytes(data)
        entry["file"] = str(path.relative_to(_common.ROOT))
    return entry


if __name__ == "__main__":
    sys.exit(main())
