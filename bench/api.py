"""Cache-hit latency of `POST /v1/remove` on loopback: `make bench-api`.

For each store (the filesystem, then S3 on a local moto server), starts a local stack
(embedded Redis, one worker process), computes one result, then serves `bgq api` as its own
process and sends it the same image over and over: every request is a cache hit (read the body,
hash it, find the PNG, send it back). Prints p50/p99 latency and requests/s, sequential and with
concurrent clients. Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.s3server import AWS_ENV, S3Server
from bgq.process import free_port
from bgq.settings import Settings, load_settings, settings_env
from bgq.stack import LocalStack
from producer.client import Producer

BIN = Path(sys.executable).parent
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "car-1.jpg"
TARGET_P50_MS = 5.0
TARGET_P99_MS = 20.0
TARGET_S3_P50_MS = 20.0  # the S3 store, against a local S3 server
TARGET_S3_P99_MS = 50.0
JPEG = {"Content-Type": "image/jpeg"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sequential(url: str, data: bytes, count: int) -> tuple[list[float], float]:
    """Latencies (s) of `count` requests one after another on one connection; total seconds."""
    latencies = []
    with httpx.Client(base_url=url) as client:
        start = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            response = client.post(
                "/v1/remove", content=data, headers={"Content-Type": "image/jpeg"}
            )
            latencies.append(time.perf_counter() - t)
            if response.status_code != 200 or response.headers["x-bgq-cached"] != "true":
                raise SystemExit(f"not a cache hit: {response.status_code} {response.text[:200]}")
        return latencies, time.perf_counter() - start


async def concurrent(url: str, data: bytes, count: int, clients: int) -> tuple[list[float], float]:
    """The same with `clients` connections in parallel."""
    latencies: list[float] = []
    per_client = count // clients

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            t = time.perf_counter()
            response = await client.post(
                "/v1/remove", content=data, headers={"Content-Type": "image/jpeg"}
            )
            latencies.append(time.perf_counter() - t)
            assert response.status_code == 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return latencies, time.perf_counter() - start


def report(name: str, latencies: list[float], seconds: float) -> tuple[float, float]:
    p50, p99 = percentile(latencies, 0.50) * 1e3, percentile(latencies, 0.99) * 1e3
    print(
        f"| {name} | {len(latencies)} | {p50:.2f} | {p99:.2f} | "
        f"{statistics.mean(latencies) * 1e3:.2f} | {len(latencies) / seconds:,.0f} |"
    )
    return p50, p99


def serve_api(settings: Settings, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`bgq api` as its own process on a free port, once it answers /healthz."""
    port = free_port()
    env = {**os.environ, **settings_env(settings)}
    api = subprocess.Popen(
        [str(BIN / "bgq"), "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "api.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return api, url
        except httpx.TransportError:
            if time.monotonic() > deadline or api.poll() is not None:
                api.kill()
                raise SystemExit(f"bgq api did not start; see {tmp / 'api.log'}") from None
            time.sleep(0.2)


def measure(
    store: str, overrides: dict[str, object], args: argparse.Namespace
) -> tuple[float, float]:
    """One store's table rows; returns the sequential run's (p50, p99)."""
    data = SAMPLE.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bgq-bench-api-") as tmp:
        settings = load_settings(
            home=Path(tmp) / "home", redis_url=None, concurrency=1, **overrides
        )
        with LocalStack(settings, log=Path(tmp) / "worker.log") as stack:
            settings = settings.model_copy(update={"redis_url": stack.url})
            Producer(settings).submit(data).wait(timeout=120)  # the one computed result
            api, url = serve_api(settings, Path(tmp))
            try:
                sequential(url, data, 100)  # warm-up: connections, caches, first imports
                p50, p99 = report(
                    f"{store}, sequential, 1 connection", *sequential(url, data, args.requests)
                )
                report(
                    f"{store}, {args.clients} connections in parallel",
                    *asyncio.run(concurrent(url, data, args.requests, args.clients)),
                )
            finally:
                api.terminate()
                api.wait(timeout=30)
    return p50, p99


def verdict(store: str, p50: float, p99: float, targets: tuple[float, float]) -> None:
    ok50, ok99 = p50 <= targets[0], p99 <= targets[1]
    print(
        f"{store} (sequential): p50 {p50:.2f} ms <= {targets[0]:g} "
        f"{'met' if ok50 else 'MISSED'}; p99 {p99:.2f} ms <= {targets[1]:g} "
        f"{'met' if ok99 else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--clients", type=int, default=8, help="connections of the parallel run")
    args = parser.parse_args()
    print(
        f"bgq api cache hits: POST /v1/remove with {SAMPLE.name} "
        f"({SAMPLE.stat().st_size / 1e3:.0f} kB in, PNG out), loopback, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}\n"
    )
    print("| store, run | requests | p50 ms | p99 ms | mean ms | requests/s |")
    print("|---|---|---|---|---|---|")
    files = measure("file", {}, args)
    with tempfile.TemporaryDirectory(prefix="bgq-bench-s3-") as tmp:
        os.environ.update(AWS_ENV)
        server = S3Server(Path(tmp) / "moto.log")
        try:
            overrides: dict[str, object] = {
                "store_url": f"s3://{server.bucket()}/bgq",
                "s3_endpoint_url": server.url,
            }
            s3 = measure("s3 (moto server on loopback)", overrides, args)
        finally:
            server.stop()
    print()
    verdict("file", *files, (TARGET_P50_MS, TARGET_P99_MS))
    verdict("s3", *s3, (TARGET_S3_P50_MS, TARGET_S3_P99_MS))


if __name__ == "__main__":
    main()
