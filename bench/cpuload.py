"""Who had the machine's CPU during a benchmark phase: our processes by kind, other processes,
the hypervisor.

A benchmark on a small shared machine measures whatever else runs beside it. Over a phase this
counts the machine's busy time, the part of it that this process and its descendants used (by
kind: pool processes, worker main process, API, Redis, ingest, the benchmark itself), the rest
(other processes) and the time the hypervisor stole, each as cores on average.
"""

from __future__ import annotations

import contextlib
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


def _ours() -> dict[int, tuple[str, float, float]]:
    """This process and each live descendant: its kind, its own CPU seconds, and those of its
    children that ended and were waited for (a worker's replaced pool processes, our ingests)."""
    me = psutil.Process()
    found = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            t = proc.cpu_times()
            ended = t.children_user + t.children_system
            found[proc.pid] = (_kind(proc, me), t.user + t.system, ended)
    return found


# Whose CPU the ended children of a process were: a worker's main process waits for its pool
# processes (replaced after BGQ_MAX_TASKS_PER_CHILD tasks), the benchmark for its ingests.
ENDED = {"worker main": "pool processes", "bench": "ingest"}


@dataclass
class Load:
    """Started at the beginning of a phase, ended at its end; then figures in cores."""

    wall: float = field(default_factory=time.monotonic)
    busy: tuple[float, float] = field(default_factory=_busy)
    ours: dict[int, tuple[str, float, float]] = field(default_factory=_ours)
    kinds: dict[str, float] = field(default_factory=dict)  # ours by kind, cores, once ended
    others: float = 0.0  # cores other processes used
    stolen: float = 0.0  # cores the hypervisor took

    def end(self) -> Load:
        seconds = max(time.monotonic() - self.wall, 1e-9)
        busy, steal = _busy()
        now = _ours()
        for pid, (kind, own, ended) in self.ours.items():
            if pid not in now:  # ended: its parent's `ended` counts its whole life; not ours
                self.kinds[kind] = self.kinds.get(kind, 0.0) - (own + ended) / seconds
        for pid, (kind, own, ended) in now.items():
            was = self.ours.get(pid)
            if was and was[0] == kind:
                own, ended = own - was[1], ended - was[2]
            self.kinds[kind] = self.kinds.get(kind, 0.0) + own / seconds
            other = ENDED.get(kind, kind)
            self.kinds[other] = self.kinds.get(other, 0.0) + ended / seconds
        self.others = max(0.0, (busy - self.busy[0]) / seconds - sum(self.kinds.values()))
        self.stolen = (steal - self.busy[1]) / seconds
        return self
