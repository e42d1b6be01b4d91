"""`make bench-elastic`: elastic workers' figures, side by side (figures, not tests).

A worker host lost mid-ingest (every process SIGKILLed), a worker host cut off from the network
for 5 minutes (network namespaces: bench/partition.py), duplicate work over a 200-image ingest
on two workers with one job held past twice the lease, and SIGTERM with a 10 s grace to a worker
holding a job that cannot end within it. tests/test_elastic.py and
tests/test_partition.py run the same scenarios and assert on their figures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.catalog import build
from bench.workers import (
    Hold,
    Loss,
    ingest_cmd,
    kill_group,
    killed_at_end,
    poll,
    small_catalog,
    started_on,
    stats_of,
    watch,
    worker_cmd,
    worker_env,
)
from bgq import contract, defaults
from bgq.contract import INPUTS
from bgq.process import spawn_group
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings, load_settings
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer import Producer
from workers.models import fetch

LEASE = defaults.LEASE  # s: a holder's lease (BGQ_LEASE), the default a user gets
FORMER_WAIT = 1800  # s: before leases, a lost job waited for Celery's visibility timeout


@dataclass
class Cluster:
    """An embedded Redis, a file store, the local stack's worker (w1) and a second worker (w2)."""

    settings: Settings
    client: redis.Redis
    tmp: Path
    first: LocalStack
    second: str  # w2's node name, before @host
    w2: subprocess.Popen[bytes]

    def env(self, name: str) -> dict[str, str]:
        return worker_env(self.settings, self.tmp / name)


@contextlib.contextmanager
def cluster(tmp: Path, model_home: Path, lease: int = LEASE, **w2_env: str) -> Iterator[Cluster]:
    """Two single-process workers on one Redis and one store (`w2_env`: more of the second
    worker's environment); everything stopped after."""
    with contextlib.ExitStack() as stack:
        server = EmbeddedRedis.start(tmp / "redis")
        stack.callback(server.stop)
        settings = Settings(
            home=tmp / "w1",
            redis_url=server.url,
            models_dir=model_home,
            concurrency=1,
            store_url=str(tmp / "store"),
            lease=lease,
        )
        first = LocalStack(settings, log=tmp / "w1.log").start()
        stack.callback(first.stop)
        second = f"w2-{os.getpid()}"
        env = {**worker_env(settings, tmp / "w2"), **w2_env}
        proc = spawn_group(worker_cmd(second), env, tmp / "w2.log")
        stack.enter_context(killed_at_end(proc))
        client = redis.Redis.from_url(server.url)
        stack.callback(client.close)
        poll(lambda: online(first, second), 120, f"{second} to answer a ping")
        yield Cluster(settings, client, tmp, first, second, proc)


def online(stack: LocalStack, name: str) -> bool:
    return any(n.startswith(name + "@") for n in Producer(stack.settings).workers_online())


def host_loss(tmp: Path, model_home: Path, images: int = 24) -> tuple[Loss, Path]:
    """A 1080p ingest on two workers; w2's whole process group SIGKILLed once it has a job."""
    src, out = tmp / "src", tmp / "out"
    build(src, images)
    with cluster(tmp, model_home) as made:
        ingest = spawn_group(ingest_cmd(src, out), made.env("producer"), tmp / "ingest.log")
        with killed_at_end(ingest):
            poll(lambda: started_on(made.client, made.second), 120, "w2 to start a job")
            kill_group(made.w2)
            lost_at = time.monotonic()
            return watch(ingest, out, images, lost_at), out


def scale_down(tmp: Path, model_home: Path, images: int = 24, grace: int = 10) -> ScaleDown:
    """A 1080p ingest on two workers, w2 holding a job longer than the grace (its input a
    named pipe: w1's intake paused until w2 has it); then SIGTERM to w2's main process, with
    BGQ_SHUTDOWN_GRACE=`grace` (issue 23's graceful scale-down)."""
    src, out = tmp / "src", tmp / "out"
    data = build(src, images)[0].read_bytes()
    with cluster(tmp, model_home, BGQ_SHUTDOWN_GRACE=str(grace)) as made:
        gate = Hold(FileStore(tmp / "store").path(INPUTS, contract.input_digest(data)))
        consuming(made, False)
        ingest = spawn_group(ingest_cmd(src, out), made.env("producer"), tmp / "ingest.log")
        with killed_at_end(ingest):
            gate.wait_for_reader(300)  # w2 has the held job: it cannot end on its own
            consuming(made, True)
            made.w2.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                made.w2.wait(timeout=grace + 60)
            exited = time.monotonic() - sent if made.w2.poll() is not None else None
            w1 = made.first.worker.pid  # type: ignore[union-attr]
            back: float | None = None
            with contextlib.suppress(AssertionError):  # not handed back: w2 gets it
                poll(lambda: gate.readers([w1]), 30, "w1 to take the handed-back job")
                back = time.monotonic() - sent
            gate.release(data)
            loss = watch(ingest, out, images, sent)
            return ScaleDown(grace, exited, back, made.w2.poll(), loss, len(partial(tmp, out)))


def consuming(made: Cluster, on: bool) -> None:
    """Start or stop w1 (the local stack's worker) taking jobs from the image queues."""
    control = Producer(made.settings).app.control
    for queue in contract.IMAGE_QUEUES:
        change = control.add_consumer if on else control.cancel_consumer
        change(queue, destination=[made.first.hostname], reply=True)


def partial(tmp: Path, out: Path) -> list[Path]:
    """Temporary or partial files in the store and the output folder."""
    found = [p for p in (tmp / "store").rglob(".*") if p.is_file()]
    return found + [p for p in out.rglob("*") if p.is_file() and p.suffix not in (".png", ".jsonl")]


@dataclass
class ScaleDown:
    grace: int
    exited: float | None  # s from the SIGTERM until w2's main process exited (None: not yet)
    back: float | None  # s from the SIGTERM until the held job was open on w1 (None: never)
    exit_code: int | None
    loss: Loss  # the ingest after the SIGTERM
    partial: int  # temporary or partial files left in the store and the output folder

    def line(self) -> str:
        gone = "did not exit" if self.exited is None else f"exited {self.exited:.1f} s"
        moved = "never" if self.back is None else f"{self.back:.1f} s after it"
        return (
            f"w2 (holding a job past the {self.grace} s grace) {gone} after SIGTERM (code "
            f"{self.exit_code}); the job running on w1: {moved}; partial files "
            f"{self.partial}; ingest: {self.loss.line()}"
        )


@dataclass
class Duplicates:
    images: int
    lease: int  # s (BGQ_LEASE of both workers)
    held: float  # s the long job was held at its input
    readers: int  # processes that had the held job's input open at once (1: never handed twice)
    stats: dict[str, int]
    exit_code: int | None
    seconds: float

    def line(self) -> str:
        s = self.stats
        return (
            f"{self.images} distinct inputs, one held {self.held:.0f} s (lease {self.lease} s): "
            f"model runs {s.get('inferences', 0)}, computed {s.get('computed', 0)}, "
            f"skipped {s.get('skipped', 0)}, failed {s.get('failed', 0)}; "
            f"holders of the held job {self.readers}; ingest exit {self.exit_code} "
            f"in {self.seconds:.1f} s"
        )


def duplicates(tmp: Path, model_home: Path, images: int = 200, lease: int = LEASE) -> Duplicates:
    """`images` small inputs on two workers, one of them held at its input for twice the
    lease and 5 s more."""
    hold = 2 * lease + 5
    src, out = tmp / "src", tmp / "out"
    paths = small_catalog(src, images)
    with cluster(tmp, model_home, lease) as made:
        data = paths[0].read_bytes()
        gate = Hold(FileStore(tmp / "store").path(INPUTS, contract.input_digest(data)))
        started = time.monotonic()
        ingest = spawn_group(ingest_cmd(src, out), made.env("producer"), tmp / "ingest.log")
        with killed_at_end(ingest):
            gate.wait_for_reader(120)
            held_from = time.monotonic()
            readers = 1
            while time.monotonic() - held_from < hold:  # the job outlives its lease meanwhile
                roots = [made.first.worker.pid, made.w2.pid]  # type: ignore[union-attr]
                readers = max(readers, len(gate.readers(roots)))
                time.sleep(0.5)
            held = time.monotonic() - held_from
            gate.release(data)
            ingest.wait(timeout=600)
            seconds = time.monotonic() - started
            stats = stats_of(made.client)
            return Duplicates(images, lease, held, readers, stats, ingest.returncode, seconds)


def main() -> None:
    from bench.partition import partition

    models = load_settings().model_home
    fetch("u2netp", models)
    with tempfile.TemporaryDirectory() as tmp:
        loss, _ = host_loss(Path(tmp) / "loss", models)
    print(f"host loss (SIGKILL of w2's processes): {loss.line()}")
    print(f"  before issue 23: the lost job waited for the {FORMER_WAIT} s visibility timeout")
    with tempfile.TemporaryDirectory() as tmp:
        cut = partition(Path(tmp), models, images=16)
    print(f"partition (w2's link down 300 s): {cut.loss.line()}")
    print(f"  after the link came back: {cut.after_line()}")
    print("  before issue 23: the job failed for good (Reject, requeue=False), ingest exit 1")
    with tempfile.TemporaryDirectory() as tmp:
        dup = duplicates(Path(tmp), models)
    print(f"duplicates: {dup.line()}")
    with tempfile.TemporaryDirectory() as tmp:
        down = scale_down(Path(tmp), models)
    print(f"scale-down (SIGTERM, BGQ_SHUTDOWN_GRACE=10): {down.line()}")


if __name__ == "__main__":
    main()
