"""Who had the machine's CPU during a benchmark phase: our processes by kind, other processes,
the hypervisor.

A benchmark on a small shared machine measures whatever else runs beside it. Over a phase this
counts the machine's busy time, the part of it that this process and its descendants used (by
kind: pool processes, worker main process, API, Redis, ingest, the benchmark itself), the rest
(other processes) and the time the hypervisor stole, each as cores on average.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field

import psutil


def _busy() -> tuple[float, float]:
    """The machine's busy and stolen CPU seconds since boot (all cores)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    steal = getattr(t, "steal", 0.0)
    return sum(t) - idle - steal, steal


def _kind(proc: psutil.Process, me: psutil.Process) -> str:
    """What one of our processes is, from its command line (and its parent's, for a pool one)."""
    if proc.pid == me.pid:
        return "bench"
    cmd = " ".join(proc.cmdline())
    if "redis-server" in cmd:
        return "redis"
    if "celery" in cmd and " worker" in cmd:
        parent = proc.parent()
        pool = parent is not None and "celery" in " ".join(parent.cmdline())
        return "pool processes" if pool else "worker main"
    for word in ("api", "ingest"):
        if f" {word}" in cmd:
            return word
    return "other of ours"


def _ours() -> dict[int, tuple[str, float]]:
    """CPU seconds of this process and each live descendant, with its kind."""
    me = psutil.Process()
    found = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            found[proc.pid] = (_kind(proc, me), sum(proc.cpu_times()[:2]))
    return found


def _waited() -> float:
    """CPU seconds of our children that ended and were waited for (ingest commands)."""
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done.ru_utime + done.ru_stime


@dataclass
class Load:
    """Started at the beginning of a phase, ended at its end; then figures in cores."""

    wall: float = field(default_factory=time.monotonic)
    busy: tuple[float, float] = field(default_factory=_busy)
    ours: dict[int, tuple[str, float]] = field(default_factory=_ours)
    waited: float = field(default_factory=_waited)
    kinds: dict[str, float] = field(default_factory=dict)  # ours by kind, cores, once ended
    others: float = 0.0  # cores other processes used
    stolen: float = 0.0  # cores the hypervisor took

    def end(self) -> Load:
        seconds = max(time.monotonic() - self.wall, 1e-9)
        busy, steal = _busy()
        for pid, (kind, cpu) in _ours().items():
            was = self.ours.get(pid)
            used = cpu - was[1] if was and was[0] == kind else cpu
            self.kinds[kind] = self.kinds.get(kind, 0.0) + used / seconds
        ended = (_waited() - self.waited) / seconds  # a process that ended, waited for by us
        self.kinds["ingest"] = self.kinds.get("ingest", 0.0) + ended
        self.others = max(0.0, (busy - self.busy[0]) / seconds - sum(self.kinds.values()))
        self.stolen = (steal - self.busy[1]) / seconds
        return self
