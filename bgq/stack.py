"""A local bgq stack: the embedded Redis (unless BGQ_REDIS_URL is set) plus one Celery worker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO

import redis

from bgq import defaults
from bgq.errors import ConfigError
from bgq.process import die_with_parent, stop_group
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings, settings_env


def worker_command(concurrency: int, hostname: str, *extra: str) -> list[str]:
    """The `celery worker` command line bgq uses (prefork pool, INFO logging)."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--pool", "prefork", "--concurrency", str(concurrency),
        "--hostname", hostname, "--loglevel", "INFO", *extra,
    ]  # fmt: skip


def flower_command(port: int, address: str) -> list[str]:
    """The Flower command line bgq uses (login from FLOWER_BASIC_AUTH in the environment)."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "flower",
        f"--port={port}", f"--address={address}",
    ]  # fmt: skip


def flower_env(settings: Settings) -> dict[str, str]:
    """Flower's own variables: the login, forgetting workers that went away, and the tasks
    page's columns (with each task's routing key: its lane)."""
    env = {
        "FLOWER_PURGE_OFFLINE_WORKERS": str(defaults.FLOWER_PURGE_OFFLINE),
        "FLOWER_TASKS_COLUMNS": defaults.FLOWER_TASKS_COLUMNS,
    }
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    return env


RESTORE_LIMIT = 1_000_000  # messages requeued at most when a stack starts


def restore_unacked(url: str) -> bool:
    """Requeue every message a dead worker had taken but not finished, at once: kombu's lease
    sweep (workers/leases.py) with a lease of 0, so the stack's jobs need not wait a lease.
    Returns whether it did.

    Only safe on a Redis no running worker uses (none holds a lease): the embedded one a stack
    has just started, while no other client is connected to it. A `bgq worker` connected to
    the stack's Redis may be running the jobs it holds: then nothing is requeued here, and the
    lease sweep requeues whatever a holder stops renewing. (Workers' capacity entries would
    not tell: a killed worker's entry outlives it by up to WORKER_ENTRY_TTL in the AOF.)
    """
    from kombu import Connection

    with redis.Redis.from_url(url, single_connection_client=True) as client:
        own = client.client_id()
        if any(int(other["id"]) != own for other in client.client_list()):
            return False
    with Connection(url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(num=RESTORE_LIMIT)
    return True


class LocalStack:
    """Starts and stops Redis (when embedded) and a prefork worker; leaves no process behind."""

    def __init__(
        self,
        settings: Settings,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        flower_port: int | None = None,
        queues: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.queues = queues  # None: every bgq queue
        self.flower_port = flower_port
        self.flower: subprocess.Popen[bytes] | None = None
        self.workers = workers or settings.concurrency
        self.env = env or {}
        self.log = log
        self.redis: EmbeddedRedis | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.hostname = f"bgq-{os.getpid()}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.url = settings.redis_url or ""

    def start(self) -> LocalStack:
        """Start everything and wait until the worker answers a ping; clean up on failure."""
        try:
            if not self.settings.redis_url:
                self.redis = EmbeddedRedis.start(self.settings.run_dir)
                self.url = self.redis.url
                restore_unacked(self.url)  # left by a stack that was killed
            self._start_worker()
            if self.flower_port is not None:
                self._start_flower(self.flower_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
        """A child in its own process group, on this stack's settings, logging to self.log."""
        settings = self.settings.model_copy(update={"redis_url": self.url})
        env = {**os.environ, **settings_env(settings), **self.env, **extra_env}
        out: IO[bytes] | None = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log, "ab")  # noqa: SIM115 - lives as long as the child
        try:
            return subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            if out is not None:
                out.close()

    def _start_worker(self) -> None:
        extra = ["--without-mingle", "--without-gossip"]
        if self.queues:
            extra += ["--queues", ",".join(self.queues)]
        self.worker = self._spawn(worker_command(self.workers, self.hostname, *extra), {})
        self._wait_ready()

    def _start_flower(self, port: int) -> None:
        self.flower = self._spawn(flower_command(port, "127.0.0.1"), flower_env(self.settings))

    def _wait_ready(self) -> None:
        # Celery (and celeryconfig's kombu queues) load only to ping the new worker.
        from celery import Celery

        import celeryconfig

        app = Celery("bgq-stack", set_as_current=False)
        app.conf.update(
            celeryconfig.build(self.settings.model_copy(update={"redis_url": self.url}))
        )
        deadline = time.monotonic() + defaults.WORKER_READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                assert self.worker is not None
                if self.worker.poll() is not None:
                    where = f"; see {self.log}" if self.log else ""
                    raise ConfigError(
                        f"the worker exited with code {self.worker.returncode}{where}"
                    )
                if app.control.ping(destination=[self.hostname], timeout=0.5):
                    return
            raise ConfigError(f"the worker did not answer within {defaults.WORKER_READY_TIMEOUT}s")
        finally:
            app.close()

    def stop(self) -> None:
        """SIGTERM the worker (running jobs get BGQ_SHUTDOWN_GRACE seconds, then go back to their
        queue: workers/shutdown.py), kill what remains after a margin, then stop Redis."""
        if self.flower is not None:
            stop_group(self.flower, defaults.WORKER_STOP_TIMEOUT)
            self.flower = None
        if self.worker is not None:
            stop_group(self.worker, self.settings.shutdown_grace + defaults.SHUTDOWN_MARGIN)
            self.worker = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def hurry(self) -> None:
        """A second SIGTERM to a stopping worker: it hands its running jobs back now."""
        worker = self.worker
        if worker is not None and worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
