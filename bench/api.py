"""Cache-hit latency of `POST /v1/remove` on loopback: `make bench-api`.

Starts a local stack (embedded Redis, one worker process), computes one result, then serves
`bgq api` as its own process and sends it the same image over and over: every request is a
cache hit (read the body, hash it, find the PNG, send it back). Prints p50/p99 latency and
requests/s, sequential and with concurrent clients. Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bgq.settings import load_settings, settings_env
from bgq.stack import LocalStack
from producer.client import Producer

BIN = Path(sys.executable).parent
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "car-1.jpg"
TARGET_P50_MS = 5.0
TARGET_P99_MS = 20.0
JPEG = {"Content-Type": "image/jpeg"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--clients", type=int, default=8, help="connections of the parallel run")
    args = parser.parse_args()
    data = SAMPLE.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bgq-bench-api-") as tmp:
        settings = load_settings(home=Path(tmp) / "home", redis_url=None, concurrency=1)
        with LocalStack(settings, log=Path(tmp) / "worker.log") as stack:
            settings = settings.model_copy(update={"redis_url": stack.url})
            Producer(settings).submit(data).wait(timeout=120)  # the one computed result
            port = free_port()
            env = {**os.environ, **settings_env(settings)}
            api = subprocess.Popen(
                [str(BIN / "bgq"), "api", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(Path(tmp) / "api.log", "wb"),  # noqa: SIM115 - closed with the process
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if httpx.get(f"{url}/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            raise SystemExit("bgq api did not start") from None
                        time.sleep(0.2)
                sequential(url, data, 100)  # warm-up: connections, caches, first imports
                print(
                    f"bgq api cache hits: POST /v1/remove with {SAMPLE.name} "
                    f"({len(data) / 1e3:.0f} kB in, PNG out), loopback, "
                    f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                    f"Python {platform.python_version()}\n"
                )
                print("| run | requests | p50 ms | p99 ms | mean ms | requests/s |")
                print("|---|---|---|---|---|---|")
                p50, p99 = report("sequential, 1 connection", *sequential(url, data, args.requests))
                report(
                    f"{args.clients} connections in parallel",
                    *asyncio.run(concurrent(url, data, args.requests, args.clients)),
                )
            finally:
                api.terminate()
                api.wait(timeout=30)
    ok50, ok99 = p50 <= TARGET_P50_MS, p99 <= TARGET_P99_MS
    print(
        f"\ntargets (sequential): p50 {p50:.2f} ms <= {TARGET_P50_MS:g} "
        f"{'met' if ok50 else 'MISSED'}; p99 {p99:.2f} ms <= {TARGET_P99_MS:g} "
        f"{'met' if ok99 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
