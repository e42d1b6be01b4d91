"""Synchronous `POST /v1/remove` requests, timed, and where each one's time went.

For the lanes benchmark (bench/lanes.py): every request carries a distinct photo (no cache hit);
afterwards the job's stored state (Celery's `date_done` and the task's stage times) splits its
latency into the time before its task started, the task's run, and the time after it.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import redis
from PIL import Image, ImageOps

from bench.catalog import SAMPLES
from bgq import contract
from bgq.settings import Settings
from producer.client import Producer

SIZE = (1280, 720)  # pixels of every request's photo
JPEG = {"Content-Type": "image/jpeg"}


def photos(count: int) -> Iterator[bytes]:
    """Distinct 1280x720 JPEGs of one photo: each has a few pixels of its own."""
    photo = ImageOps.cover(Image.open(SAMPLES / "car-1.jpg").convert("RGB"), SIZE)
    for i in range(count):
        frame = photo.copy()
        for dx in range(4):
            frame.putpixel((i % 1200 + dx, i // 1200), (i % 251, 255 - i % 251, dx * 60))
        out = io.BytesIO()
        frame.save(out, "JPEG", quality=90)
        yield out.getvalue()


@dataclass
class Sent:
    """One synchronous request: when it was sent and answered (epoch s), and its job."""

    sent: float
    answered: float
    key: str
    accepted: bool  # 202: the default wait ran out, the result was polled for afterwards

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


def remove(url: str, data: bytes) -> Sent:
    """POST /v1/remove with the default wait; on a 202, poll the job until it is done (as a
    client would), and count the request answered then."""
    with httpx.Client(base_url=url, timeout=600) as client:
        sent = time.time()
        response = client.post("/v1/remove", content=data, headers=JPEG)
        if response.status_code == 200:
            return Sent(sent, time.time(), response.headers["x-bgq-job-id"], False)
        if response.status_code != 202:
            raise SystemExit(f"POST /v1/remove: {response.status_code} {response.text[:300]}")
        key = response.json()["id"]
        for _ in range(2400):  # 10 minutes at most
            if client.get(f"/v1/jobs/{key}").json()["status"] == "done":
                return Sent(sent, time.time(), key, True)
            time.sleep(0.25)
        raise SystemExit(f"job {key} not done after 10 minutes")


def epoch(value: object) -> float:
    """Epoch seconds of a Celery `date_done` (a datetime or ISO text; naive means UTC)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def breakdown(settings: Settings, sent: list[Sent]) -> tuple[float, float, float]:
    """Medians (s) of: sent -> task started (upload, submit, wait for a slot), the task's run
    (the sum of its stage times), task done -> answered (the API's poll interval, the
    response)."""
    metas = Producer(settings).task_metas([s.key for s in sent])
    before, run, after = [], [], []
    for s, meta in zip(sent, metas, strict=True):
        done = epoch(meta["date_done"])
        seconds = sum(meta["result"]["seconds"].values())
        before.append(done - seconds - s.sent)
        run.append(seconds)
        after.append(s.answered - done)
    return statistics.median(before), statistics.median(run), statistics.median(after)


def waited(settings: Settings) -> tuple[float, int]:
    """The interactive lane's wait histogram so far: total seconds enqueue -> start, jobs."""
    with redis.Redis.from_url(settings.redis_url or "") as client:
        found = client.hgetall(contract.wait_key(contract.INTERACTIVE))
    return float(found.get(b"sum", 0)), int(found.get(b"count", 0))
