"""System redis-server processes the tests start on loopback: TLS, ACL users, Sentinel, AOF.

Each test stops what it starts (`servers` fixture in test modules); nothing outlives a test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from bgq.process import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
READY_TIMEOUT = 30.0  # seconds a server may take to accept connections


def listens(pid: int, port: int) -> bool:
    """Process `pid` listens on `port` (not merely: something answers there, which may be
    another test process's server on a port reused)."""
    with contextlib.suppress(psutil.Error):
        connections = psutil.Process(pid).net_connections("tcp")
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)
    return False


@dataclass
class Server:
    """One redis-server (or Sentinel) process; kill() is an outage, start() brings it back."""

    port: int
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, *self.args], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not listens(self.proc.pid, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None


class Servers:
    """The servers of one test, all in one folder; stop() kills every one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.all: list[Server] = []

    def start(self, name: str, *args: str, port: int | None = None) -> Server:
        """A redis-server with these extra arguments (no snapshots unless they say so)."""
        port = port or free_port()
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = ["--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--port", str(port)]
        server = Server(port, [*base, *args], folder / "server.log")
        self.all.append(server)
        return server.start()

    def sentinel(self, name: str, master: str, master_port: int) -> Server:
        """A Sentinel watching `master` with short timeouts (failover within a few seconds)."""
        port = free_port()
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {folder}\n"
            f"sentinel monitor {master} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {master} 1000\n"
            f"sentinel failover-timeout {master} 3000\n"
        )
        server = Server(port, [str(conf), "--sentinel"], folder / "server.log")
        self.all.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.all:
            server.kill()


@contextlib.contextmanager
def servers(root: Path) -> Iterator[Servers]:
    group = Servers(root)
    try:
        yield group
    finally:
        group.stop()


def master_port(sentinel_port: int, master: str) -> int:
    """The port of the master a Sentinel currently names."""
    client = redis.Redis(port=sentinel_port, socket_timeout=2)
    with client:
        _host, port = client.sentinel_get_master_addr_by_name(master)
    return int(port)
