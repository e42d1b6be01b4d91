"""A local bgq stack: the embedded Redis (unless BGQ_REDIS_URL is set) plus one Celery worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO

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


RESTORE_LIMIT = 1_000_000  # messages requeued at most when a stack starts


def restore_unacked(url: str) -> None:
    """Requeue every message a dead worker had taken but not finished (no visibility wait).

    Only safe on a Redis no running worker uses: the embedded one a stack has just started.
    """
    from kombu import Connection

    with Connection(url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(num=RESTORE_LIMIT)


class LocalStack:
    """Starts and stops Redis (when embedded) and a prefork worker; leaves no process behind."""

    def __init__(
        self,
        settings: Settings,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.settings = settings
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
        except BaseException:
            self.stop()
            raise
        return self

    def _start_worker(self) -> None:
        settings = self.settings.model_copy(update={"redis_url": self.url})
        env = {**os.environ, **settings_env(settings), **self.env}
        out: IO[bytes] | None = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log, "ab")  # noqa: SIM115 - lives as long as the worker
        self.worker = subprocess.Popen(
            worker_command(self.workers, self.hostname, "--without-mingle", "--without-gossip"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if out is not None:
            out.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
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
        """Warm-stop the worker (running tasks finish), kill what remains, then stop Redis."""
        if self.worker is not None:
            stop_group(self.worker, defaults.WORKER_STOP_TIMEOUT)
            self.worker = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
