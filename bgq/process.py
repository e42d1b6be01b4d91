"""Child-process helpers for the local stack (and the tests' and benchmarks' servers): a free
port to give a server, die with the parent, start and stop a whole group."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl option: signal the child when its parent dies


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server about to start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: a child of ours gets SIGTERM if we die without cleaning up (e.g. SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_group(
    cmd: Sequence[str], env: dict[str, str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`cmd` leading a process group of its own, dying with us, its output appended to `log`
    (None: discarded)."""
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a process leading its own group, wait, then SIGKILL whatever is left of the group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
