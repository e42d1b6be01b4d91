"""Pieces of the elastic-worker scenarios (bench/elastic.py, tests/test_elastic*.py): a second
`bgq worker` on a cluster, which tasks a worker has started, an ingest watched from its report.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
from PIL import Image, ImageOps

from bgq.contract import STATS_KEY
from bgq.settings import Settings, settings_env

BGQ = str(Path(sys.executable).with_name("bgq"))
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
WORKER_FLAGS = ("--without-mingle", "--without-gossip")  # as bgq/stack.py starts its worker
TASK_META = "celery-task-meta-"  # Celery's result-backend keys (STARTED: pid and hostname)
LOSS_BOUND = 60.0  # seconds: the target after a loss, on top of the remaining work


def small_catalog(folder: Path, count: int, size: tuple[int, int] = (160, 120)) -> list[Path]:
    """`count` distinct small JPEGs cut from the sample photos (a crop offset per image)."""
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        step = index // len(photos)
        box = (step % 40 * 3, step // 40 * 3, photo.width - 60, photo.height - 60)
        path = folder / f"img{index:05d}.jpg"
        ImageOps.fit(photo.crop(box), size).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def worker_env(settings: Settings, home: Path) -> dict[str, str]:
    """The environment of another bgq process on the cluster of `settings`, with its own home."""
    own = settings.model_copy(update={"home": home, "concurrency": 1})
    return {**os.environ, **settings_env(own)}


def worker_cmd(name: str) -> list[str]:
    """`bgq worker --concurrency 1` named `name@<host>`."""
    return [BGQ, "worker", "--concurrency", "1", "-n", f"{name}@%h", *WORKER_FLAGS]


def ingest_cmd(src: Path, out: Path) -> list[str]:
    return [BGQ, "ingest", str(src), "--out", str(out)]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of `proc`'s group (a host lost at once) and reap `proc`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def killed_at_end(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        kill_group(proc)


def started_on(client: redis.Redis, prefix: str) -> list[str]:
    """Ids of the tasks whose last state is STARTED on a worker named `prefix`...@host."""
    found = []
    for key in client.scan_iter(f"{TASK_META}*", count=1000):
        with contextlib.suppress(TypeError, ValueError):
            meta = json.loads(client.get(key) or b"null")
            where = (meta.get("result") or {}).get("hostname", "")
            if meta.get("status") == "STARTED" and where.startswith(prefix + "@"):
                found.append(key.decode().removeprefix(TASK_META))
    return found


def failed_tasks(client: redis.Redis) -> list[str]:
    """Ids of the tasks whose state is FAILURE in the result backend."""
    found = []
    for key in client.scan_iter(f"{TASK_META}*", count=1000):
        with contextlib.suppress(TypeError, ValueError):
            if json.loads(client.get(key) or b"null").get("status") == "FAILURE":
                found.append(key.decode().removeprefix(TASK_META))
    return found


def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Wait until `predicate()` is true; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def reported(out: Path) -> int:
    """Inputs the ingest writing to `out` has finished (lines of its report)."""
    with contextlib.suppress(FileNotFoundError):
        return len((out / "bgq-report.jsonl").read_text().splitlines())
    return 0


@dataclass
class Loss:
    """What an ingest did after one of its workers was lost (killed, or cut off)."""

    images: int
    done_at_loss: int  # inputs the ingest had finished when the worker was lost
    others_done: float  # s from the loss until all but the lost input were finished
    pace: float  # s per input of the surviving worker after the loss
    finished: float | None  # s from the loss until the ingest exited; None: not in the wait
    exit_code: int | None
    waited: float  # s the ingest was followed after the loss

    @property
    def remaining(self) -> float:
        """The remaining work at the loss: what the survivor took for the others, plus the
        lost input once more at the survivor's pace."""
        return self.others_done + self.pace

    @property
    def budget(self) -> float:
        return LOSS_BOUND + self.remaining

    def line(self) -> str:
        if self.finished is None:
            ended = f"not finished in {self.waited:.0f} s"
        else:
            ended = f"done in {self.finished:.1f} s"
        return (
            f"{self.images} images, {self.done_at_loss} done at the loss; after it: {ended} "
            f"(exit {self.exit_code}), remaining work {self.remaining:.1f} s "
            f"({self.others_done:.1f} s for the others + {self.pace:.1f} s/image), "
            f"target <= {self.budget:.1f} s"
        )


def watch(
    ingest: subprocess.Popen[bytes],
    out: Path,
    images: int,
    lost_at: float,
    slack: float = 60,
    cap: float = 900,
) -> Loss:
    """Follow the ingest from the loss (monotonic `lost_at`) until it exits, or until well past
    the target (`slack` s after 60 s + the remaining work, `cap` s at most); then kill it."""
    done_at_loss = reported(out)
    others_done: float | None = None
    while ingest.poll() is None:
        now = time.monotonic() - lost_at
        if others_done is None and reported(out) >= images - 1:
            others_done = now
        limit = cap if others_done is None else LOSS_BOUND + 2 * others_done + slack
        if now > min(limit, cap):
            break
        time.sleep(0.1)
    waited = time.monotonic() - lost_at
    finished = waited if ingest.poll() is not None else None
    if others_done is None:
        others_done = waited
    kill_group(ingest)
    survivor = max(1, images - 1 - done_at_loss)
    pace = others_done / survivor
    return Loss(images, done_at_loss, others_done, pace, finished, ingest.returncode, waited)


class Hold:
    """A named pipe in place of one stored input: the pool process that reads it waits in
    open()/read() until `release(data)`, so its job runs as long as the caller likes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.fd: int | None = None

    def wait_for_reader(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:  # ENXIO: no reader yet
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def readers(self, roots: list[int]) -> list[int]:
        """Pids in the process trees of `roots` that have the pipe open."""
        found = []
        for root in roots:
            with contextlib.suppress(psutil.Error):
                for proc in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
                    with contextlib.suppress(OSError):
                        fds = os.listdir(f"/proc/{proc.pid}/fd")
                        if any(_target(proc.pid, fd) == str(self.path) for fd in fds):
                            found.append(proc.pid)
        return found

    def release(self, data: bytes) -> None:
        """Give the reader `data` and end of file."""
        assert self.fd is not None, "no reader yet"
        os.set_blocking(self.fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.close(self.fd)
        self.fd = None


def _target(pid: int, fd: str) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    return ""


def stats_of(client: redis.Redis) -> dict[str, int]:
    counters: dict[bytes, bytes] = client.hgetall(STATS_KEY)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in counters.items()}
