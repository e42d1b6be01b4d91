"""The Python API other services import: `Producer().submit(image).wait()`."""

from __future__ import annotations

import atexit
import functools
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from kombu.exceptions import OperationalError

from bgq import contract, defaults, lanes
from bgq.connections import redis_client
from bgq.contract import BULK, INPUTS, INTERACTIVE, Counter, TaskArgs
from bgq.errors import (
    BgqError,
    BrokerError,
    ImageTooLarge,
    InvalidImage,
    PermanentError,
    UnsupportedImage,
)
from bgq.imageinfo import probe
from bgq.options import Options
from bgq.settings import Settings, load_settings
from bgq.store import open_store
from producer import enqueue
from producer.job import Job
from producer.outage import Outage
from producer.served import ServedModels

if TYPE_CHECKING:
    from celery import Celery

Source = bytes | str | os.PathLike[str]
T = TypeVar("T")

IMAGE_ERRORS = (InvalidImage, ImageTooLarge, UnsupportedImage)  # about one image, not the setup


def host_label() -> str:
    """This host's name as the start of a bulk run's name (contract.RUN_RE)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32]
    return host.strip("-._") or "host"


def default_run() -> str:
    """A Producer's bulk run when none is given: this host and process."""
    return f"{host_label()}-{os.getpid()}"


def read_source(source: Source) -> bytes:
    """The image bytes of a submit() argument: bytes as they are, else a file path."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return Path(source).read_bytes()


class Producer:
    """Submits images to bgq; settings come from the environment unless given.

    close() (or a `with` block) flushes its batched hit count, and the producer takes no more
    submits; the process's exit flushes too.

    Jobs go to the interactive lane unless a submit says `lane="bulk"`: bulk jobs of one run
    (`run`, else this producer's) share the bulk capacity equally with other runs.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        retry_seconds: float | None = None,
        run: str | None = None,
        served_memo: float = defaults.SERVED_MEMO,
    ) -> None:
        """`retry_seconds` overrides BGQ_BROKER_RETRY_SECONDS (0: a request handler that must
        answer at once); `run` names this producer's bulk run (default: host and process);
        `served_memo`: seconds a model found served is trusted (producer/served.py)."""
        self.run = contract.check_run(run) if run is not None else default_run()
        self.settings = settings or load_settings()
        self.store = open_store(self.settings)
        self._app: Celery | None = None
        self._lock = threading.Lock()
        self._hits = 0  # cache hits not yet added to the counters in Redis
        self._last_flush = time.monotonic()
        self._stats_client: redis.Redis | None = None
        budget = self.settings.broker_retry_seconds if retry_seconds is None else retry_seconds
        self._outage = Outage(budget)
        self._timer: threading.Timer | None = None  # flushes hits when no later hit does
        self._closed = False
        self.served = ServedModels(self._read_served, served_memo)

    @property
    def app(self) -> Celery:
        """A light Celery app for publishing (created on first enqueue: cache hits need none)."""
        if self._app is None:
            # Celery and celeryconfig's kombu queues load on the first enqueue: hits need neither.
            from celery import Celery

            import celeryconfig

            app = Celery("bgq-producer", set_as_current=False)
            app.conf.update(celeryconfig.build(self.settings))
            self._app = app
        return self._app

    def _read_served(self) -> dict[str, lanes.Node]:
        """The live workers' capacity entries: the lanes and models each serves."""
        client = self.app.backend.client
        return self.with_broker("read workers", lambda: lanes.capacity(client))

    def workers_online(self, timeout: float = 1.0) -> list[str]:
        """The names of the Celery workers that answer a ping on this broker."""
        try:
            replies = self.app.control.ping(timeout=timeout) or []
        except (redis.RedisError, OSError, OperationalError) as exc:
            raise BrokerError(f"cannot ping workers: {exc}") from exc
        return sorted(name for reply in replies for name in reply)

    def put_image(self, data: bytes) -> str:
        """Store an image for `bg_image` (checked as an input is: a bad one raises its
        PermanentError, as are bytes over BGQ_MAX_UPLOAD_MB) and return its digest:
        `submit(..., bg_image=digest)`."""
        if len(data) > self.settings.max_upload_bytes:
            raise ImageTooLarge(
                f"an image of {len(data)} bytes, over the BGQ_MAX_UPLOAD_MB limit of "
                f"{self.settings.max_upload_mb:g} MiB ({self.settings.max_upload_bytes} bytes)"
            )
        probe(data, self.settings.max_megapixels)
        digest = contract.input_digest(data)
        self.store.put_input(digest, data)
        return digest

    def submit(
        self,
        source: Source,
        model: str | None = None,
        *,
        lane: str = INTERACTIVE,
        run: str | None = None,
        **options: Any,
    ) -> Job:
        """Submit one image (bytes or a path); bad input raises a PermanentError at once."""
        data = read_source(source)
        model = contract.check_model(model or self.settings.model)
        return self.submit_data(data, model, Options.parse(options), lane=lane, run=run)

    def submit_many(
        self,
        sources: Iterable[Source],
        model: str | None = None,
        *,
        lane: str = INTERACTIVE,
        run: str | None = None,
        **options: Any,
    ) -> list[Job]:
        """Submit many images with the same options; a bad image becomes a failed Job."""
        self._check_open()
        opts = Options.parse(options)
        model = contract.check_model(model or self.settings.model)
        contract.check_lane(lane)
        jobs = []
        for source in sources:
            name = None if isinstance(source, bytes | bytearray | memoryview) else str(source)
            try:
                data = read_source(source)
            except OSError as exc:
                err = PermanentError(f"cannot read {name}: {exc.strerror or exc}")
                jobs.append(Job("", False, error=err, source=name))
                continue
            job = self.submit_data(data, model, opts, False, lane=lane, run=run)
            job.source = name
            jobs.append(job)
        return jobs

    def submit_data(
        self,
        data: bytes,
        model: str,
        options: Options,
        raise_bad_image: bool = True,
        *,
        lane: str = INTERACTIVE,
        run: str | None = None,
    ) -> Job:
        """Short-circuit on a stored result (no Redis call); else check, store and enqueue.

        A bad image raises its PermanentError, or with raise_bad_image False gives a failed Job;
        a model no live worker serves in `lane` raises ModelNotServed, before anything is
        stored or sent.
        """
        self._check_open()
        contract.check_lane(lane)
        run = contract.check_run(run) if run is not None else self.run
        args = TaskArgs.build(contract.input_digest(data), model, options)
        if self.store.use_output(args.output):
            self._count_hit()
            return Job(args.key, True, self.store, self, args=args, lane=lane, run=run)
        try:
            probe(data, self.settings.max_megapixels)
            self._check_background(options)
        except IMAGE_ERRORS as exc:
            if raise_bad_image:
                raise
            return Job(args.key, False, self.store, error=exc, lane=lane, run=run)
        self.served.require(model, lane)
        self.store.put_input(args.input_sha256, data)
        self._enqueue(args, lane, run)
        return Job(args.key, False, self.store, self, args=args, lane=lane, run=run)

    def _check_background(self, options: Options) -> None:
        """bg_image names a stored input: stamped as used, so prune's grace covers this job."""
        if options.bg_image is not None and not self.store.use(INPUTS, options.bg_image):
            raise InvalidImage(
                f"bg_image: no image {options.bg_image} in the store (Producer.put_image)"
            )

    def _check_open(self) -> None:
        """A closed producer counts no more hits and starts no more timers: it refuses submits."""
        if self._closed:
            raise PermanentError("this Producer is closed: create a new one to submit images")

    def _enqueue(self, args: TaskArgs, lane: str, run: str, miss: bool = True) -> None:
        """Publish the task unless an identical job is already queued or running.

        One round trip takes the guard, marks the input blobs as needed by this job (prune keeps
        them), and adds this miss and the batched cache hits to the cluster's counters. Through a
        broker outage the step is retried: the guard's token lets a retry win its own guard.
        An interactive job that finds an identical bulk one waiting promotes it.
        """
        with self._lock:
            hits, self._hits = self._hits, 0
        token = lanes.guard_token(lane, uuid.uuid4().hex)
        send = functools.partial(enqueue.publish, self.app, args, token, lane, run, miss, hits)
        try:
            holder = self.with_broker("enqueue", send)
        except BrokerError:
            with self._lock:
                self._hits += hits  # not counted yet: the next flush adds them
            raise
        if holder is None:
            self.with_broker("enqueue", lambda: enqueue.hold(self.app, args, token, lane, run))
        elif lane == INTERACTIVE and holder == BULK:
            self._promote(args)

    def _promote(self, args: TaskArgs) -> None:
        """An interactive submit of a job a bulk enqueue holds and that has not started: claim
        it, send an interactive copy, confirm (producer/enqueue.py). Each step is retried on
        its own through an outage, so a retry never sends a second copy.

        The copy is sent before the bulk message is marked: a producer that dies in between
        leaves two messages, never none (the claim expires, the bulk message is not dropped).
        A bulk message already let into the bulk queue runs too, and finds the result stored.
        """
        if self.task_meta(args.key)["status"] != "PENDING":
            return  # started (or over): nothing to promote
        token = lanes.guard_token(INTERACTIVE, uuid.uuid4().hex)
        if self.with_broker("promote", lambda: enqueue.claim(self.app, args, token)) is None:
            return  # no bulk enqueue holds it (any more), or another submitter promotes it
        send = functools.partial(enqueue.send, self.app, args, INTERACTIVE, self.run, token)
        self.with_broker("promote", send)
        self.with_broker("promote", lambda: enqueue.confirm(self.app, args, token))

    def with_broker(self, doing: str, operation: Callable[[], T]) -> T:
        """Run a Redis operation, riding out an outage for up to BGQ_BROKER_RETRY_SECONDS."""
        return self._outage.call(doing, operation)

    def _count_hit(self) -> None:
        """Count a cache hit; the count reaches Redis in batches, not one call per hit.

        A batch is flushed by the next hit after the interval, else by a timer; and by close()
        or the process's exit.
        """
        with self._lock:
            self._hits += 1
            due = time.monotonic() - self._last_flush >= defaults.STATS_FLUSH_INTERVAL
            timer = None if due or self._timer is not None else self._new_timer()
        _unflushed.add(self)
        if timer is not None:
            timer.start()
        if due:
            self.flush_stats()

    def _new_timer(self) -> threading.Timer:
        """A daemon timer that flushes this producer's hits after the interval (lock held)."""
        self._timer = threading.Timer(defaults.STATS_FLUSH_INTERVAL, self._timed_flush)
        self._timer.daemon = True
        return self._timer

    def _timed_flush(self) -> None:
        """The timer's flush; if Redis cannot be reached, the next hit, close() or exit retries."""
        with self._lock:
            self._timer = None
        self.flush_stats()

    def close(self) -> None:
        """Flush the batched hit count and release the connections; the producer is done."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush_stats()
        with self._lock:
            if not self._hits:  # else Redis could not take them: the exit's flush tries again
                _unflushed.discard(self)
        if self._stats_client is not None:
            self._stats_client.close()
            self._stats_client = None
        if self._app is not None:
            self._app.backend.client.connection_pool.disconnect()
            self._app.close()
            self._app = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush_stats(self) -> None:
        """Add the cache hits counted so far to the cluster's counters; best effort.

        With no Redis to reach (nothing running and no BGQ_REDIS_URL), they stay counted here
        until one is there; hits of a producer that never meets a Redis are not recorded.
        """
        with self._lock:
            hits, self._hits = self._hits, 0
            self._last_flush = time.monotonic()
        if not hits:
            return
        try:
            if self._stats_client is None:
                self._stats_client = redis_client(self.settings, timeout=1, connect_timeout=1)
            self._stats_client.hincrby(contract.STATS_KEY, Counter.CACHE_HITS, hits)
        except (redis.RedisError, BgqError):
            with self._lock:
                self._hits += hits

    def requeue_if_lost(
        self, args: TaskArgs, lane: str = INTERACTIVE, run: str | None = None
    ) -> bool:
        """Enqueue again a job that nobody holds any more (message lost, or guard expired);
        True if its result turned out to be in the store already.

        The guard is held from enqueue until the final state is stored, so a pending job
        without a guard was lost — or its guard expired: after GUARD_TTL, or GUARD_PUBLISH_TTL
        when its producer could not extend it once the task was sent. A second message then
        costs at most a second look: the task finds the stored result or the mask lock.
        """
        guard = contract.guard_key(args.key)
        lost = not self.with_broker("read job state", lambda: self.app.backend.client.exists(guard))
        if not lost:
            return False
        if self.store.has_output(args.output):
            return True
        self._enqueue(args, lane, run or self.run, miss=False)
        return False

    def task_meta(self, key: str) -> dict[str, Any]:
        """The task's state as Celery stored it (status, result or exception)."""
        return self.task_metas([key])[0]

    def task_metas(self, keys: list[str]) -> list[dict[str, Any]]:
        """The states of many tasks in one round trip (PENDING for those with none stored)."""
        if not keys:
            return []
        backend = self.app.backend
        names = [backend.get_key_for_task(k) for k in keys]
        raw = self.with_broker("read job state", lambda: backend.client.mget(names))
        return [
            dict(backend.decode_result(value)) if value else {"status": "PENDING"} for value in raw
        ]


_unflushed: weakref.WeakSet[Producer] = weakref.WeakSet()  # producers that counted hits


@atexit.register
def _flush_at_exit() -> None:
    """A one-shot `bgq submit` (or any script) adds its last hits before the process ends."""
    for producer in list(_unflushed):
        producer.flush_stats()
