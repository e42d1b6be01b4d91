"""Test data helpers: the sample photos and fresh variants of them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import numpy as np
import psutil
import redis
import uvicorn
from celery import Celery
from PIL import Image

from bench.photoserver import PhotoServer
from bgq import contract, defaults, lanes
from bgq.contract import INPUTS
from bgq.settings import Settings
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer import Producer
from producer.api import create_app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
GOLDEN = ROOT / "tests" / "data" / "anime-girl-1.u2netp.png"


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def variant(name: str, box: tuple[int, int, int, int], fmt: str = "JPEG") -> bytes:
    """A new image (never seen by the cache) cropped from a sample photo."""
    buf = io.BytesIO()
    Image.open(SAMPLES / name).convert("RGB").crop(box).save(buf, fmt)
    return buf.getvalue()


BGQ = str(Path(sys.executable).with_name("bgq"))


def bgq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BGQ, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def bgq_in_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`bgq ARGS` run in this process (typer's CliRunner on producer.cli's app), for the checks
    that refuse a command before it starts anything: usage errors, bad settings, start checks.

    `env` is laid over os.environ for the call. A command that would go on to exec a process or
    serve HTTP fails the test instead; an exception no handler turned into an exit is raised
    (a real process would have printed its traceback). Real `bgq` processes run the entry
    point in each command family's own tests (test_cli.py, test_ingest.py, test_s3.py ...).
    """
    from typer.testing import CliRunner

    from producer.cli import app

    def started(*started_args: object, **_: object) -> None:
        raise AssertionError(f"bgq {' '.join(args)} started {started_args[:1]} instead of refusing")

    with (
        mock.patch.object(os, "execv", started),
        mock.patch.object(os, "execve", started),
        mock.patch.object(uvicorn, "run", started),
    ):
        result = CliRunner().invoke(app, list(args), env=env, prog_name="bgq")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess([BGQ, *args], result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    """Serve `server` on a thread for the block; shut it down and close it after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def wait_for(predicate: object, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            if text in " ".join(proc.info["cmdline"] or []) or text in str(proc.info["environ"]):
                found.append(proc)
    return found


def pixels(png: bytes | Path) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as img:
        return img.mode, np.asarray(img)


def assert_same_pixels(result: bytes | Path, expected: bytes) -> None:
    """`result` decodes to exactly `expected`'s pixels: same mode, same size, same values."""
    mode, got = pixels(result)
    want_mode, want = pixels(expected)
    same = mode == want_mode and got.shape == want.shape and bool((got == want).all())
    assert same, result if isinstance(result, Path) else f"{len(result)} bytes"


def stats(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(contract.STATS_KEY).items()}


def settle(client: redis.Redis, key: str, timeout: float = 30) -> None:
    """Wait until the job's guard is released; its outcome is counted in the same transaction.

    A result PNG is visible before Celery stores the state and the worker's after_return
    records the outcome, so counters read right after Job.wait() may lag one step.
    """
    deadline = time.monotonic() + timeout
    while client.exists(contract.guard_key(key)):
        assert time.monotonic() < deadline, f"guard of {key} never released"
        time.sleep(0.01)


def stale_leftovers(store: FileStore) -> tuple[Path, Path]:
    """An input no job needs and a leftover temporary file, both older than prune's grace
    periods (an input's, a temporary's): the next prune of `store` removes both."""
    name = hashlib.sha256(os.urandom(16)).hexdigest()
    store.write(INPUTS, name, b"an input no job needs")
    temporary = store.root / f".leftover-{name[:12]}.tmp"
    temporary.write_bytes(b"half a result")
    old = time.time() - 2 * max(defaults.PRUNE_TMP_AGE, defaults.PRUNE_INPUT_GRACE)
    for path in (store.path(INPUTS, name), temporary):
        os.utime(path, (old, old))
    return store.path(INPUTS, name), temporary


STAND_IN = "stand-in-"  # how a StandInWorker's node name starts


class StandInWorker:
    """A capacity entry saying that a worker serves `models` (by default in both lanes with no
    pool process), renewed every WORKER_BEAT seconds until closed: jobs for those models are
    accepted in those lanes (producer/served.py) and wait in their queues, since nothing takes
    them. No pool process: the bulk queue's depth (lanes.DISPATCH) is not changed by it."""

    def __init__(
        self,
        url: str,
        models: tuple[str, ...] = (contract.BASE_MODEL,),
        lanes: tuple[str, ...] = contract.LANES,
        processes: int = 0,
        node: str | None = None,
    ) -> None:
        self.client = redis.Redis.from_url(url)
        self.node = node or f"{STAND_IN}{os.getpid()}-{id(self)}@test"
        self.models = list(models)
        self.lanes = list(lanes)
        self.processes = processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="stand-in", daemon=True)

    def start(self) -> StandInWorker:
        self._register()
        self._thread.start()
        return self

    def _register(self) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            lanes.register_worker(pipe, self.node, self.lanes, self.processes, self.models)
            pipe.execute()

    def _renew(self) -> None:
        while not self._stop.wait(defaults.WORKER_BEAT):
            with contextlib.suppress(redis.RedisError):  # a test that stops Redis: next beat
                self._register()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with contextlib.suppress(redis.RedisError):
            lanes.unregister_worker(self.client, self.node)
        self.client.close()

    def __enter__(self) -> StandInWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


CONTROL_TIMEOUT = 30.0  # seconds a control command waits for its worker's reply (it returns at it)


def consume(app: Celery, hostname: str, queue: str, *, on: bool) -> None:
    """Have one worker start (`on`) or stop consuming `queue`, and check that it said ok.

    Celery's default reply timeout (1 s) returns [] when the reply comes later, as on a loaded
    machine. An ok means the worker took the command: its event loop carries it out next, and
    a poll already sent may still take a job (see `settle_polls`)."""
    command = app.control.add_consumer if on else app.control.cancel_consumer
    replies = command(queue, destination=[hostname], reply=True, timeout=CONTROL_TIMEOUT)
    assert [list(reply) for reply in replies] == [[hostname]], replies
    assert "ok" in replies[0][hostname], replies


def inspect_worker(app: Celery, hostname: str, query: str) -> Any:
    """One worker's answer to an inspect query (`stats`, `active_queues`, ...); it must answer
    (the call returns at its reply: with a destination, Celery waits for that many replies)."""
    replies = getattr(app.control.inspect(destination=[hostname], timeout=CONTROL_TIMEOUT), query)()
    assert replies and hostname in replies, replies
    return replies[hostname]


class LocalStackControl:
    """Stop and restart a stack's worker consuming the image queues (jobs stay queued; a
    stand-in entry keeps the model served meanwhile, as a worker busy with other jobs would)."""

    def __init__(self, stack: LocalStack) -> None:
        self.app = Producer(stack.settings.model_copy(update={"redis_url": stack.url})).app
        self.hostname = stack.hostname
        self.url = stack.url
        self.stand_in: StandInWorker | None = None

    def pause(self) -> None:
        if self.stand_in is None:
            self.stand_in = StandInWorker(self.url).start()
        for queue in contract.IMAGE_QUEUES:
            consume(self.app, self.hostname, queue, on=False)
        # The worker answers before its event loop cancels the consumers, and a poll already
        # sent still covers the queues: once it has polled twice more, no job is taken.
        settle_polls(self.stand_in.client)

    def resume(self) -> None:
        for queue in contract.IMAGE_QUEUES:  # in order: added consumers go last
            consume(self.app, self.hostname, queue, on=True)
        if self.stand_in is not None:
            # The worker's entry says which lanes it consumes from its next beat on: until
            # then the stand-in keeps them served (a producer asking meanwhile is not refused).
            client = self.stand_in.client
            wait_for(
                lambda: (
                    set(contract.LANES)
                    <= set(getattr(lanes.capacity(client).get(self.hostname), "lanes", ()))
                ),
                what="the worker's entry to serve every lane again",
            )
            self.stand_in.close()
            self.stand_in = None


def settle_polls(client: redis.Redis) -> None:
    """Return once the worker has polled its queues twice more (two BRPOPs): a poll sent
    before it stopped consuming a queue (LocalStackControl.pause) may still take a job from it,
    the ones after cannot. Counted server-wide: on a BGQ_TEST_REDIS_URL shared by several test
    processes, their workers' polls count too, and the wait may end early."""

    def polls() -> int:
        stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
        return int(stats.get("cmdstat_brpop", {}).get("calls", 0))

    start = polls()
    wait_for(lambda: polls() >= start + 2, 10, "the worker to poll its queues again")


JPEG = {"Content-Type": "image/jpeg"}  # the headers of a raw JPEG body


def error_of(response: httpx.Response) -> dict[str, str]:
    """The API's one error shape, `{"error": {"code", "message"}}`, checked and unwrapped."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return dict(body["error"])


def answers(url: str, text: str = "") -> bool:
    """True when a GET of `url` answers 200 (containing `text`); False while nothing listens."""
    try:
        response = httpx.get(url, timeout=10)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and text in response.text


class ApiServer:
    """create_app() under uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings, app: object = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app or create_app(settings), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> ApiServer:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20, what="the API to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextlib.contextmanager
def api_servers(stack: LocalStack) -> Iterator[Callable[..., str]]:
    """Start APIs on `stack`, each with some settings changed (returns its base URL); all
    stop when the block ends."""
    servers: list[ApiServer] = []

    def start(**overrides: Any) -> str:
        settings = stack.settings.model_copy(update={"redis_url": stack.url, **overrides})
        servers.append(ApiServer(settings).start())
        return servers[-1].url

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


class ImageServer(PhotoServer):
    """The sample photos on a real HTTP server on loopback, for image_url and url rows.

    `/photos/NAME` and `/alias/NAME` serve the sample NAME; `/page.html` is HTML; anything else
    is 404. Each answer waits `delay` seconds, so concurrent fetches overlap; `most_in_flight`
    is the most requests it was ever serving at once.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="bgq-photos-")
        root = Path(self.folder.name)
        for sub in ("photos", "alias"):
            (root / sub).mkdir()
            for photo in SAMPLES.glob("*.jpg"):
                (root / sub / photo.name).symlink_to(photo)
        (root / "page.html").write_bytes(b"<html><body>not a photo</body></html>")
        super().__init__(root, delay)

    def photo(self, name: str, folder: str = "photos") -> str:
        return f"{self.url}/{folder}/{name}"

    def start(self) -> ImageServer:
        return self  # serving since it was made

    def stop(self) -> None:
        super().stop()
        self.folder.cleanup()


class Gate:
    """A named pipe in place of one file of a filesystem store, to hold a worker at that file.

    A pool process that reads the file blocks in open() until `wait_for_reader()` opens the
    write end, then in read() until `let_through(data)` writes the file's bytes and closes it.
    So the test knows, without timing, that the job is there and stays there meanwhile.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.fd: int | None = None

    def wait_for_reader(self, timeout: float = 120) -> None:
        """Return once a process is opening the file for reading (it then blocks in read()).

        The kernel counts a reader from the start of its open(), before the file is in its
        descriptor table: a reader descheduled there is not yet in /proc (see `reader`).
        """
        deadline = time.monotonic() + timeout
        while self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:  # ENXIO: nobody has it open for reading yet
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def reader(self, parent: int, timeout: float = 120) -> psutil.Process:
        """The child process of `parent` that holds the file open (the blocked pool process),
        looked for until its open() has returned: after `wait_for_reader` it may not have."""
        deadline = time.monotonic() + timeout
        while (found := self._holder(parent)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no child of {parent} has {self.path} open")
            time.sleep(0.02)
        return found

    def _holder(self, parent: int) -> psutil.Process | None:
        for child in psutil.Process(parent).children():
            with contextlib.suppress(psutil.Error, OSError):
                for fd in os.listdir(f"/proc/{child.pid}/fd"):
                    if os.readlink(f"/proc/{child.pid}/fd/{fd}") == str(self.path):
                        return child
        return None

    def let_through(self, data: bytes) -> None:
        """Give the blocked reader `data` and end of file; the path stays a named pipe."""
        assert self.fd is not None, "no reader yet"
        os.set_blocking(self.fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.close()

    def close(self) -> None:
        """Close the write end (a blocked reader gets end of file); the pipe stays in place."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
