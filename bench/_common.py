"""Helpers shared by the bench/ scripts: timing statistics, a tiny HTTP client with cookies and the CSRF token,
process memory from /proc, and starting `python app.py` as a real server."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAMPLES = ROOT / "tests" / "data" / "samples"
TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def sample_jpeg() -> tuple[str, bytes]:
    """A real 320x240 JPEG from the Kaggle test set (tests/data/samples)."""
    path = sorted(SAMPLES.glob("*/*.jpeg"))[0]
    return path.name, path.read_bytes()


def stats_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {
        "n": len(ms),
        "median_ms": round(float(np.median(ms)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def time_calls(fn, runs: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return stats_ms(seconds)


def rss_mb(pid: int) -> dict:
    """VmRSS (now) and VmHWM (peak) of a process, in MB, from /proc (psutil is not a dependency)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MB
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode_multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class HttpClient:
    """urllib with a cookie jar, so the CSRF token from the home page is accepted on POST."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.token: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 60.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with self.opener.open(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def fetch_token(self) -> str | None:
        status, body = self.request("GET", "/")
        match = TOKEN_RE.search(body.decode("utf-8", "replace"))
        self.token = match.group(1) if match else None
        return self.token

    def post_files(self, path: str, files: list[tuple[str, bytes]], field: str = "file") -> tuple[int, bytes]:
        fields = {"csrf_token": self.token} if self.token and not path.startswith("/api/") else {}
        body, content_type = encode_multipart(fields, [(field, name, data) for name, data in files])
        return self.request("POST", path, body, content_type)


def start_server(port: int, env: dict | None = None) -> subprocess.Popen:
    """`python app.py --host 127.0.0.1 --port PORT` in the repository root: the production command of
    docs/serving.md (waitress, 4 threads)."""
    return subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=tempfile.TemporaryFile(),  # not a pipe: the request log would fill it and block the server
    )


def wait_until_serving(process: subprocess.Popen, base: str, start: float, timeout: float = 120.0) -> float:
    """Seconds from `start` (time.perf_counter() before the process was started) until GET / answers 200."""
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            process.stderr.seek(0)
            raise RuntimeError(f"server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"server did not answer within {timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_results(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def environment() -> dict:
    import platform

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load_average(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
