"""Bounded load test against a real server on 127.0.0.1.

    python bench/load.py                          # the full run: 60 s and at least 5,000 requests (whichever
                                                  # is later, never more than --max-duration 1800 s)
    python bench/load.py --duration 10 --min-requests 0 --out load_smoke --label smoke   # a smoke run
    python bench/load.py --url http://127.0.0.1:8000 --pid 1234   # an already running server (pid for RSS)

Without --url it starts the production server of docs/serving.md itself: `python app.py --host 127.0.0.1
--port PORT` (waitress, 4 threads, the TFLite runtime), with a FLASK_SECRET_KEY set, and stops it at the end.
Only loopback addresses are accepted as --url.

Each of --clients (8) clients keeps one HTTP/1.1 connection, loads the home page once (session cookie + CSRF
token), then posts real 320x240 JPEGs in a loop: single images to /predict (the HTML page) and, when the server
has the JSON API, every --batch-every'th request a batch of --batch-size images to /api/predict. Meanwhile the
server's resident memory (VmRSS) is sampled every second together with the number of requests served.

Reports and writes to bench/results/<--out>.json: the number of 5xx answers and connection errors (the run
passes only with zero of both), p50/p90/p99 latency overall and per kind, requests and images per second, and
the memory trend: a least-squares line of RSS against requests served over the second half of the run (by
requests), whose growth over that half must stay under --max-growth-mb (5 MB; a leak of 1 KB per request would
show as ~2.5 MB over 2,500 requests). The trend counts as checked only with at least 5,000 requests. Exit status
1 when there was a 5xx or connection error, the memory grew, or --min-requests was not reached in time.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import secrets
import sys
import threading
import time
import urllib.parse
from collections import Counter

import _common  # bench/: the script's own folder
import numpy as np

MAX_GROWTH_MB = 5.0  # fitted RSS growth over the second half of the run (by requests served)
MIN_REQUESTS_FOR_TREND = 5000


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    def __init__(self, base: str):
        parsed = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        self.cookie = ""
        self.token = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.cookie:
            headers["Cookie"] = self.cookie
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()  # reconnect on the next request; counted as an error by the caller
            raise
        cookie = response.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        return response.status, data

    def start(self) -> None:
        status, body = self.request("GET", "/")
        match = _common.TOKEN_RE.search(body.decode("utf-8", "replace"))
        self.token = match.group(1) if match else None

    def post(self, path: str, files: list[tuple[str, bytes]]):
        fields = {"csrf_token": self.token} if self.token and not path.startswith("/api/") else {}
        body, content_type = _common.encode_multipart(fields, [("file", name, data) for name, data in files])
        return self.request("POST", path, body, {"Content-Type": content_type})


def has_api(base: str) -> bool:
    client = Client(base)
    try:
        status, _ = client.request("GET", "/api/health")
    except OSError:
        return False
    return status == 200


def run(base: str, pid: int | None, clients: int, duration: float, batch_every: int, batch_size: int,
        min_requests: int = 0, max_duration: float = 1800.0, max_growth_mb: float = MAX_GROWTH_MB) -> dict:
    samples = sorted(_common.SAMPLES.glob("*/*.jpeg"))
    images = [(path.name, path.read_bytes()) for path in samples]
    use_api = batch_every > 0 and has_api(base)
    records: list[tuple[float, str, int, float]] = []  # (finished at, kind, status, seconds)
    errors = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    served = [0]

    def worker(index: int) -> None:
        client = Client(base)
        client.start()
        n = index
        while not stop.is_set():
            n += 1
            batch = use_api and n % batch_every == 0
            if batch:
                kind, path = "api batch", "/api/predict"
                files = [images[(n + i) % len(images)] for i in range(batch_size)]
            else:
                kind, path, files = "page single", "/predict", [images[n % len(images)]]
            start = time.perf_counter()
            try:
                status, _ = client.post(path, files)
            except (http.client.HTTPException, OSError) as exc:
                with lock:
                    errors[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - start
            with lock:
                records.append((time.perf_counter(), kind, status, elapsed))
                served[0] += 1

    memory: list[tuple[float, int, float]] = []  # (time, requests served, RSS MB)

    def sampler() -> None:
        while not stop.is_set():
            if pid:
                with lock:
                    count = served[0]
                memory.append((time.perf_counter(), count, _common.rss_mb(pid)["rss_mb"]))
            stop.wait(1.0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    monitor = threading.Thread(target=sampler, daemon=True)
    began = time.perf_counter()
    monitor.start()
    for thread in threads:
        thread.start()
    time.sleep(min(duration, max_duration))
    while served[0] < min_requests and time.perf_counter() - began < max_duration:
        time.sleep(0.5)  # go on until the memory trend has enough requests behind it (bounded by max_duration)
    stop.set()
    for thread in threads:
        thread.join(timeout=130)
    monitor.join(timeout=5)
    wall = time.perf_counter() - began
    result = summarise(records, errors, memory, wall, clients, use_api, batch_every, batch_size, max_growth_mb)
    result["min_requests"] = min_requests
    result["min_requests_reached"] = result["requests"] >= min_requests
    return result


def summarise(records, errors, memory, wall, clients, use_api, batch_every, batch_size,
              max_growth_mb: float = MAX_GROWTH_MB) -> dict:
    statuses = Counter(status for _, _, status, _ in records)
    by_kind = {}
    if records:
        by_kind["all"] = _common.stats_ms([elapsed for _, _, _, elapsed in records])
    for kind in sorted({kind for _, kind, _, _ in records}):
        seconds = [elapsed for _, k, _, elapsed in records if k == kind]
        by_kind[kind] = _common.stats_ms(seconds)
    total = len(records)
    server_errors = sum(count for status, count in statuses.items() if status >= 500)
    result = {
        "clients": clients,
        "duration_s": round(wall, 1),
        "json_api_batches": use_api,
        "batch_every": batch_every if use_api else None,
        "batch_size": batch_size if use_api else None,
        "requests": total,
        "requests_per_s": round(total / wall, 1),
        "images_per_s": round(sum(batch_size if k == "api batch" else 1 for _, k, _, _ in records) / wall, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": dict(errors),
        "server_errors_5xx": server_errors,
        "other_non_200": sum(count for status, count in statuses.items() if status != 200 and status < 500),
        "latency": by_kind,
        "zero_5xx": server_errors == 0 and not errors,
    }
    if memory:
        rss = [mb for _, _, mb in memory]
        result["rss_mb"] = {"first": rss[0], "last": rss[-1], "max": max(rss), "samples": len(rss)}
        result["memory_trend"] = memory_trend(memory, total, max_growth_mb)
        result["rss_samples"] = [[round(t - memory[0][0], 1), n, mb] for t, n, mb in memory]
    return result


def memory_trend(memory, total: int, max_growth_mb: float = MAX_GROWTH_MB) -> dict:
    """Least-squares RSS (MB) against requests served over the second half of the run, by requests served (the
    first half lets allocators, caches and the interpreters warm up). Flat = fitted growth over that half below
    max_growth_mb."""
    final = memory[-1][1]
    points = [(n, mb) for _, n, mb in memory if n >= final / 2]
    if len(points) < 5 or points[-1][0] == points[0][0]:
        return {"checked": False, "ok": True, "why": "too few samples"}
    x, y = np.array(points, dtype=np.float64).T
    slope, _ = np.polyfit(x, y, 1)
    growth = slope * (x[-1] - x[0])
    trend = {
        "mb_per_1000_requests": round(float(slope * 1000), 3),
        "fitted_growth_mb": round(float(growth), 2),
        "max_growth_mb": max_growth_mb,
        "requests_in_fit": int(x[-1] - x[0]),
        "samples_in_fit": len(points),
        "rss_range_in_fit_mb": [round(float(y.min()), 1), round(float(y.max()), 1)],
        "checked": total >= MIN_REQUESTS_FOR_TREND,
    }
    trend["ok"] = bool(growth <= max_growth_mb)
    if not trend["checked"]:
        trend["why"] = f"fewer than {MIN_REQUESTS_FOR_TREND} requests: the slope is indicative only"
    return trend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server; default: start `python app.py` on a free port")
    parser.add_argument("--pid", type=int, help="the --url server's process id, for its memory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="at least this many seconds (default 60)")
    parser.add_argument("--min-requests", type=int, default=MIN_REQUESTS_FOR_TREND,
                        help="and at least this many requests (default 5000, what the memory trend needs; 0: none)")
    parser.add_argument("--max-duration", type=float, default=1800.0, help="hard limit in seconds (default 1800)")
    parser.add_argument("--max-growth-mb", type=float, default=MAX_GROWTH_MB,
                        help=f"largest fitted RSS growth over the second half (default {MAX_GROWTH_MB:g} MB)")
    parser.add_argument("--batch-every", type=int, default=5, help="every Nth request a batch (0: singles only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default="load")
    args = parser.parse_args(argv)

    process = None
    base, pid = args.url, args.pid
    if base is not None and not is_loopback(base):
        parser.error(f"--url must be a loopback address (127.0.0.0/8, localhost, ::1), not {base}")
    if base is None:
        port = _common.free_port()
        base = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        # The production command of docs/serving.md; a fixed secret key as a deployment would have.
        process = _common.start_server(port, env={"FLASK_SECRET_KEY": secrets.token_hex(32)})
        startup = _common.wait_until_serving(process, base, started)
        pid = process.pid
        print(f"server up in {startup:.2f} s (pid {pid})")
    try:
        result = run(base, pid, args.clients, args.duration, args.batch_every, args.batch_size,
                     args.min_requests, args.max_duration, args.max_growth_mb)
    finally:
        if process is not None:
            _common.stop_server(process)
    result = {"environment": _common.environment(), "label": args.label, "url": base, **result}
    path = _common.write_results(args.out, result)
    print_report(result)
    print(f"\nwrote {path.relative_to(_common.ROOT)}")
    trend_ok = result.get("memory_trend", {}).get("ok", True)
    return 0 if result["zero_5xx"] and trend_ok and result["min_requests_reached"] else 1


def print_report(result: dict) -> None:
    print(f"\nload test {result['label']}: {result['clients']} clients, {result['duration_s']} s, "
          f"{result['requests']} requests ({result['requests_per_s']} req/s, {result['images_per_s']} images/s)")
    print(f"statuses {result['statuses']}, connection errors {result['connection_errors'] or 0}")
    print(f"zero 5xx: {'yes' if result['zero_5xx'] else 'NO'} ({result['server_errors_5xx']} answers with 5xx)")
    if not result["min_requests_reached"]:
        print(f"STOPPED at --max-duration before {result['min_requests']} requests")
    for kind, row in result["latency"].items():
        print(f"  {kind:12} p50 {row['median_ms']:8.1f} ms   p90 {row['p90_ms']:8.1f} ms   p99 {row['p99_ms']:8.1f} ms"
              f"   n={row['n']}")
    if "rss_mb" in result:
        rss, trend = result["rss_mb"], result["memory_trend"]
        print(f"RSS MB: first {rss['first']}, last {rss['last']}, max {rss['max']} ({rss['samples']} samples)")
        if "mb_per_1000_requests" in trend:
            verdict = "ok" if trend["ok"] else "GROWING"
            checked = "" if trend["checked"] else f" ({trend['why']})"
            print(f"memory trend (second half): {trend['mb_per_1000_requests']} MB per 1000 requests, fitted growth "
                  f"{trend['fitted_growth_mb']} MB over {trend['requests_in_fit']} requests "
                  f"(limit {trend['max_growth_mb']} MB): {verdict}{checked}")


if __name__ == "__main__":
    sys.exit(main())
