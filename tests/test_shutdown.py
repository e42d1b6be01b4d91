"""Graceful scale-down (workers/shutdown.py): SIGTERM to a real prefork worker on a real Redis.

Jobs are held in their model run by a Gate on their stored-masks lookup (past their Redis
calls); a worker that takes such a job again after a hand-back blocks there again, until the
test removes the gate (end of file: no stored masks, so the job runs the model).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu.transport.redis import Channel

from bgq import contract, defaults, lanes
from bgq.contract import MASKS, TaskArgs, input_digest
from bgq.fileio import is_temporary
from bgq.options import Options
from bgq.settings import Settings, settings_env
from bgq.stack import LocalStack, worker_command
from bgq.store import FileStore, open_store
from producer import Producer
from tests.helpers import BGQ, Gate, assert_same_pixels, pixels, variant, wait_for
from tests.redis_servers import Servers

GRACE = 10.0  # seconds: the target
LEASE = 120  # seconds (scale-down test): a job that went back by its lease would take minutes


def image(i: int) -> bytes:
    """A small photo no other test submits."""
    x = 4 * i
    return variant("plants-1.jpg", (x, 20, x + 200, 180))


def job_args(data: bytes) -> TaskArgs:
    return TaskArgs.build(input_digest(data), "u2netp", Options())


def queued(client: redis.Redis, queue: str = contract.QUEUE) -> list[str]:
    """The task ids waiting in a queue, the next to be taken last (BRPOP takes the right end)."""
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def taken(client: redis.Redis) -> set[str]:
    """The task ids that a worker holds (kombu's `unacked` hash)."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals(Channel.unacked_key)}


class Monitor:
    """Every command Redis runs while it is open (MONITOR, on a socket and a thread of its own)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        kwargs = client.connection_pool.connection_kwargs
        self.sock = socket.create_connection((kwargs["host"], kwargs["port"]), timeout=10)
        self.sock.sendall(b"MONITOR\r\n")
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wait_for(lambda: self.data.startswith(b"+OK"), 10, "MONITOR")

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                self.data += chunk

    @property
    def lines(self) -> list[str]:
        return bytes(self.data).decode(errors="replace").splitlines()

    def count(self, text: str) -> int:
        """How many commands contain `text` (case aside: clients spell commands as they like)."""
        return sum(text.lower() in line.lower() for line in self.lines)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *_: object) -> None:
        marker = f"end-of-monitor-{time.monotonic_ns()}"  # Redis echoes commands in order
        self.client.echo(marker)
        wait_for(lambda: marker.encode() in self.data, 10, "the monitor to catch up")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.sock.close()


def temporaries(store: FileStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if is_temporary(p.name)]


class Cluster:
    """Local stacks (one worker each) on the test Redis, sharing one home and so one store."""

    def __init__(self, redis_url: str, home: Path, model_home: Path) -> None:
        self.settings = Settings(home=home, redis_url=redis_url, models_dir=model_home)  # type: ignore[call-arg]
        self.stacks: list[LocalStack] = []
        self.client = redis.Redis.from_url(redis_url)

    def start(self, concurrency: int, grace: float = GRACE, lease: int | None = None) -> LocalStack:
        update: dict[str, object] = {"concurrency": concurrency, "shutdown_grace": grace}
        if lease is not None:
            update["lease"] = lease
        settings = self.settings.model_copy(update=update)
        log = settings.home / f"worker{len(self.stacks)}.log"
        stack = LocalStack(settings, log=log)
        self.stacks.append(stack)
        return stack.start()

    def stop(self) -> None:
        for stack in self.stacks:
            stack.stop()
        self.client.flushdb()
        self.client.close()


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path, model_home: Path) -> Iterator[Cluster]:
    group = Cluster(redis_url, tmp_path / "home", model_home)
    try:
        yield group
    finally:
        group.stop()


def terminate(stack: LocalStack) -> float:
    """SIGTERM the stack's worker (its Celery main process); the monotonic time it was sent."""
    assert stack.worker is not None
    sent = time.monotonic()
    stack.worker.send_signal(signal.SIGTERM)
    return sent


def drained(stack: LocalStack) -> None:
    """Until the worker has taken in the signal: its intake is stopped (its log says so)."""
    log = stack.log
    assert log is not None
    wait_for(lambda: "taking no new jobs" in log.read_text(), 30, "the worker to stop its intake")


def held_gates(store: FileStore, *data: bytes) -> list[Gate]:
    return [Gate(store.path(MASKS, job_args(d).masks)) for d in data]


def test_sigterm_finishes_what_fits_the_grace_and_hands_back_the_rest_at_once(
    cluster: Cluster, reference: Callable[..., bytes]
) -> None:
    """Two jobs run, SIGTERM: the worker takes no new job; the one let through during the
    grace is written and acknowledged; the one still held is back at the head of its queue
    within about a second of the grace's end, the worker exits 0 just after, and a new worker
    runs it; nothing is left in `unacked`, no temporary file in the store."""
    stack = cluster.start(concurrency=2)
    store = open_store(cluster.settings)
    assert isinstance(store, FileStore)
    first, second, third = image(1), image(2), image(3)
    gates = held_gates(store, first, second)
    producer = Producer(cluster.settings)
    jobs = [producer.submit_data(d, "u2netp", Options()) for d in (first, second)]
    try:
        for gate in gates:
            gate.wait_for_reader()
        sent = terminate(stack)
        late = producer.submit_data(third, "u2netp", Options())  # queued after the signal
        drained(stack)  # before a process is free to take it
        gates[0].remove()
        jobs[0].wait(timeout=60)
        wait_for(lambda: jobs[1].key in queued(cluster.client), 30, "the held job's return")
        back = time.monotonic() - sent
        assert stack.worker is not None
        code = stack.worker.wait(timeout=30)
        exited = time.monotonic() - sent
        print(f"\nSIGTERM (grace {GRACE:g} s): back after {back:.2f} s, exit after {exited:.2f} s")
        assert code == 0
        # At the grace's end, not a lease later (30 s): bounds with room for a loaded machine.
        assert GRACE <= back < GRACE + 5, back
        assert exited < GRACE + 8, exited
        # The held job went to the head (the next taken), before the job queued meanwhile.
        assert queued(cluster.client) == [late.key, jobs[1].key]
        assert not taken(cluster.client)
        assert not store.has_output(jobs[1].output) and not store.has_output(late.output)
        gates[1].close()  # its reader was killed; the next one opens it anew
        cluster.start(concurrency=1)
        gates[1].wait_for_reader()
        gates[1].remove()
        for job, data in zip((jobs[0], jobs[1], late), (first, second, third), strict=True):
            assert_same_pixels(job.read(timeout=120), reference(data))
    finally:
        for gate in gates:
            gate.remove()
        producer.close()
    wait_for(lambda: not taken(cluster.client), 30, "the acknowledgements")
    assert not temporaries(store)


def test_held_countdown_messages_go_back_at_once_and_an_idle_worker_exits_at_once(
    cluster: Cluster,
) -> None:
    """A retry waiting out its countdown is held by the worker (in `unacked`, not queued): at
    SIGTERM it is back in its queue, countdown and all, and the worker, running nothing,
    exits 0 well before the grace."""
    stack = cluster.start(concurrency=1)
    producer = Producer(cluster.settings)
    data = image(4)
    args = job_args(data)
    try:
        producer.store.put_input(args.input_sha256, data)
        producer.app.send_task(
            contract.TASK_NAME, kwargs=args.to_kwargs(), task_id=args.key, countdown=600
        )
        wait_for(lambda: taken(cluster.client) == {args.key}, 30, "the worker to take it")
        assert queued(cluster.client) == []
        sent = terminate(stack)
        wait_for(lambda: queued(cluster.client) == [args.key], 10, "its return")
        back = time.monotonic() - sent
        assert stack.worker is not None
        code = stack.worker.wait(timeout=10)
        exited = time.monotonic() - sent
        print(f"\nSIGTERM, one countdown held: back after {back:.2f} s, exit after {exited:.2f} s")
        assert code == 0
        # The bug: holding them until the grace's end (a normal idle stop takes about 1.5 s,
        # 2-3 times that on a loaded machine).
        assert back < GRACE / 2 and exited < GRACE, (back, exited)
        assert not taken(cluster.client)
        (raw,) = cluster.client.lrange(contract.QUEUE, 0, -1)
        assert json.loads(raw)["headers"]["eta"], "the countdown was lost"
    finally:
        producer.close()


class Prefetching(LocalStack):
    """A stack whose worker prefetches twice its pool's size (`--prefetch-multiplier 2`, as a
    `bgq worker` command line may say): a job then waits in the worker for a free process."""

    def _start_worker(self) -> None:
        extra = ["--without-mingle", "--without-gossip", "--prefetch-multiplier", "2"]
        self.worker = self._spawn(worker_command(self.workers, self.hostname, *extra), {})
        self._wait_ready()


def test_a_prefetched_job_goes_back_at_once_and_the_running_one_finishes(
    cluster: Cluster, reference: Callable[..., bytes]
) -> None:
    """One pool process, two jobs taken: one runs (held), one waits for the process. At SIGTERM
    the waiting one is back in its queue at once, untouched; the running one, let through,
    finishes in the grace, and the worker exits 0 without waiting for the rest of the grace.
    A grace of 3 x GRACE: the running job's inference and the exit fit well within it however
    loaded the machine, and a worker that waited it out would still be seen."""
    grace = 3 * GRACE
    settings = cluster.settings.model_copy(update={"concurrency": 1, "shutdown_grace": grace})
    stack = Prefetching(settings, log=settings.home / "prefetching.log")
    cluster.stacks.append(stack)
    stack.start()
    store = open_store(settings)
    assert isinstance(store, FileStore)
    running, waiting = image(6), image(7)
    (gate,) = held_gates(store, running)
    producer = Producer(settings)
    try:
        jobs = [producer.submit_data(d, "u2netp", Options()) for d in (running, waiting)]
        gate.wait_for_reader()
        wait_for(lambda: taken(cluster.client) == {j.key for j in jobs}, 30, "the prefetch")
        sent = terminate(stack)
        wait_for(lambda: queued(cluster.client) == [jobs[1].key], 10, "the waiting job's return")
        back = time.monotonic() - sent
        assert taken(cluster.client) == {jobs[0].key}
        gate.remove()
        assert_same_pixels(jobs[0].read(timeout=60), reference(running))
        assert stack.worker is not None
        assert stack.worker.wait(timeout=2 * grace) == 0
        exited = time.monotonic() - sent
        print(f"\nSIGTERM, one prefetched: back after {back:.2f} s, exit after {exited:.2f} s")
        # The bugs: the waiting job held until the grace's end; the worker waiting the grace out.
        assert back < GRACE / 2 and exited < grace, (back, exited)
        assert not taken(cluster.client) and queued(cluster.client) == [jobs[1].key]
        assert not store.has_output(jobs[1].output)
    finally:
        gate.remove()
        producer.close()


def holder(stacks: list[LocalStack], gate: Gate) -> LocalStack:
    """The stack whose worker has a pool process at the gate."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for stack in stacks:
            assert stack.worker is not None
            if gate._holder(stack.worker.pid) is not None:
                return stack
        time.sleep(0.05)
    raise AssertionError(f"no worker has {gate.path} open")


def test_an_ingest_completes_when_one_of_two_workers_is_scaled_down(
    cluster: Cluster, tmp_path: Path, env: dict[str, str], reference: Callable[..., bytes]
) -> None:
    """Two single-process workers share an ingest; the one holding a job mid-run gets SIGTERM
    (grace 2 s): the job goes back at once, the other worker runs it, and the ingest finishes
    with every output identical to rembg's, long before any lease or visibility timeout."""
    stacks = [cluster.start(1, grace=2, lease=LEASE), cluster.start(1, grace=2, lease=LEASE)]
    store = open_store(cluster.settings)
    assert isinstance(store, FileStore)
    images = {f"{i}.png": image(10 + i) for i in range(6)}
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, data in images.items():
        (src / name.replace(".png", ".jpg")).write_bytes(data)
    (gate,) = held_gates(store, images["2.png"])
    env = {**env, **settings_env(cluster.settings)}
    ingest = subprocess.Popen(
        [BGQ, "ingest", str(src), "--out", str(out), "--window", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        gate.wait_for_reader()
        leaving = holder(stacks, gate)
        staying = stacks[1 - stacks.index(leaving)]
        sent = terminate(leaving)
        assert leaving.worker is not None
        assert leaving.worker.wait(timeout=30) == 0
        exited = time.monotonic() - sent
        assert staying.worker is not None
        # The other worker has it now (its read blocks: the test still holds the write end).
        gate.reader(staying.worker.pid, timeout=30)
        reached = time.monotonic() - sent
        gate.remove()
        stdout, stderr = ingest.communicate(timeout=120)
        finished = time.monotonic() - sent
    finally:
        gate.remove()
        if ingest.poll() is None:
            ingest.kill()
        ingest.communicate()  # closes its pipes, whichever way the test went
    print(
        f"\nscale-down mid-ingest: worker exit {exited:.2f} s, job on the other worker "
        f"{reached:.2f} s, ingest done {finished:.2f} s"
    )
    assert ingest.returncode == 0, stdout + stderr
    assert "6 inputs" in stdout and "0 failed" in stdout, stdout
    # The grace of 2 s, not the default's (SHUTDOWN_GRACE, 25 s), then about 1.5 s (2-3 times
    # that on a loaded machine).
    assert exited < defaults.SHUTDOWN_GRACE / 2, exited
    assert reached < exited + LEASE / 4, (reached, exited)  # at once, no lease waited for
    assert finished < LEASE, finished
    assert sorted(p.name for p in out.glob("*.png")) == sorted(images)
    for name, data in images.items():
        mode, got = pixels(out / name)
        want_mode, want = pixels(reference(data))
        assert mode == want_mode and (got == want).all(), name
    assert not temporaries(store)


def test_a_second_sigterm_hands_running_jobs_back_now(cluster: Cluster) -> None:
    """Grace 300 s, one job held: the first SIGTERM only stops the intake (the job stays held),
    a second (what `bgq up` sends at a second Ctrl-C: LocalStack.hurry) hands it back at once
    and the worker exits 0."""
    stack = cluster.start(concurrency=1, grace=300)
    store = open_store(cluster.settings)
    assert isinstance(store, FileStore)
    data = image(5)
    (gate,) = held_gates(store, data)
    producer = Producer(cluster.settings)
    try:
        job = producer.submit_data(data, "u2netp", Options())
        gate.wait_for_reader()
        terminate(stack)
        drained(stack)
        assert taken(cluster.client) == {job.key} and stack.worker is not None
        assert stack.worker.poll() is None
        (tag,) = (t.decode() for t in cluster.client.hkeys(Channel.unacked_key))
        with Monitor(cluster.client) as monitor:
            sent = time.monotonic()
            stack.hurry()
            # The bug: the second SIGTERM ignored, the job held to the grace's end (300 s).
            wait_for(lambda: queued(cluster.client) == [job.key], 30, "its return")
            back = time.monotonic() - sent
            assert stack.worker.wait(timeout=60) == 0
            exited = time.monotonic() - sent
        print(f"\nsecond SIGTERM: back after {back:.2f} s, exit after {exited:.2f} s")
        assert back < 30 and exited < 60, (back, exited)
        assert not taken(cluster.client)
        # Its record left `unacked` once, in the hand-back's transaction: no acknowledgement
        # after it, which would delete the record of a worker that took the job meanwhile.
        assert monitor.count(f'"hdel" "{Channel.unacked_key}" "{tag}"') == 1, monitor.lines
        # A hand-back is no lost host: its start does not count towards MAX_STARTS.
        assert int(cluster.client.get(contract.starts_key(job.key)) or 0) == 0
    finally:
        gate.remove()
        producer.close()


def test_sigterm_while_the_broker_is_down_still_stops_the_worker(
    tmp_path: Path, model_home: Path
) -> None:
    """Redis gone, the worker retrying its connection (no event loop runs) with a job running
    in a pool process: SIGTERM still ends the worker, exit 0, once the grace is over (the job's
    pool process killed with it), not after the job (Celery's warm stop would wait for it:
    here for ever). What it had taken stays in Redis, for its lease."""
    group = Servers(tmp_path / "redis")
    server = group.start("broker")
    home = tmp_path / "home"
    grace = 3.0
    settings = Settings(  # type: ignore[call-arg]
        home=home, models_dir=model_home, concurrency=1, shutdown_grace=grace,
        redis_url=f"redis://127.0.0.1:{server.port}/0",
    )  # fmt: skip
    stack = LocalStack(settings, log=home / "worker.log")
    store = open_store(settings)
    assert isinstance(store, FileStore)
    data = image(7)
    (gate,) = held_gates(store, data)
    producer = Producer(settings)
    try:
        stack.start()
        job = producer.submit_data(data, "u2netp", Options())
        gate.wait_for_reader()  # the job runs, held in its model run
        client = redis.Redis(port=server.port)
        assert taken(client) == {job.key}
        client.close()
        server.kill()
        log = home / "worker.log"
        wait_for(lambda: "Cannot connect" in log.read_text(), 60, "the worker to retry")
        sent = terminate(stack)
        assert stack.worker is not None
        assert stack.worker.wait(timeout=60) == 0
        exited = time.monotonic() - sent
        print(f"\nSIGTERM, broker down, a job running: exit after {exited:.2f} s")
        assert exited < grace + 10, exited
        assert "the grace ended with the broker out of reach" in log.read_text()
    finally:
        gate.remove()
        producer.close()
        stack.stop()
        group.stop()


def unread(port: int) -> int:
    """Bytes sent to the server on this loopback port that it has not read (/proc/net/tcp)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, _state, queues = line.split()[1:5]
        if int(local.split(":")[1], 16) == port:
            total += int(queues.split(":")[1], 16)
    return total


def test_sigterm_stops_a_worker_whose_event_loop_retries_the_broker_for_ever(
    tmp_path: Path, model_home: Path
) -> None:
    """Redis dies while the worker's event loop waits for its reply (Celery's heartbeat, whose
    publish retries the broker with no bound): no tick runs, yet the consumer is up. SIGTERM,
    and the parent-death SIGTERM of an embedded stack's worker (`bgq ingest` killed), still end
    it, exit 0, once the grace is over; before, it slept in that retry for ever."""
    group = Servers(tmp_path / "redis")
    server = group.start("broker")
    home = tmp_path / "home"
    grace = 2.0
    settings = Settings(  # type: ignore[call-arg]
        home=home, models_dir=model_home, concurrency=1, shutdown_grace=grace, lease=600,
        redis_url=f"redis://127.0.0.1:{server.port}/0",
    )  # fmt: skip
    stack = LocalStack(settings, log=home / "worker.log")
    try:
        stack.start()
        assert stack.worker is not None and server.proc is not None
        # Freeze Redis just after a lane beat: the next call to Redis, the heartbeat's (every
        # 2 s; lane beats every 5 s, lease beats every 100 s), waits for its reply.
        beat = lanes.beat_file(settings.run_dir, stack.hostname)
        wait_for(beat.exists, 30, "a lane beat")
        first = beat.stat().st_mtime_ns
        wait_for(lambda: beat.stat().st_mtime_ns != first, 30, "the next lane beat")
        server.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: unread(server.port), 10, "a request to wait in the frozen Redis")
        sent = terminate(stack)
        server.kill()  # the wait fails; the heartbeat's publish retries, the loop stays stuck
        assert stack.worker.wait(timeout=grace + 30) == 0
        exited = time.monotonic() - sent
        print(f"\nSIGTERM, the event loop stuck on a dead broker: exit after {exited:.2f} s")
        assert exited < grace + 10, exited
    finally:
        stack.stop()
        group.stop()
