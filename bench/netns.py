"""Hosts on one machine for the partition tests: network namespaces on a bridge of their own.

Each host is a namespace (`ip netns add`) with `lo` up and one veth onto a bridge that lives in
a namespace of its own; the root namespace's interfaces and routes are never touched (the veth
pairs are created inside the namespaces). Names carry this process's id, so runs side by side
never meet; the subnet is private to the bridge. A "cut" sets a host's link (the bridge side of
its veth) down while its processes live on. `Network.close()` (also run at exit) kills every
process a host started and deletes every namespace, with the links in them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from bgq.process import spawn_group

SUBNET = "10.231.0"  # /24 on the bridge; only the namespaces on it see it
CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace
_serial = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def network_tag(pid: int, serial: int) -> str:
    """The 9-character prefix of a network's names: "b", the pid in 6 hex digits (Linux's
    pid_max is at most 2**22), the serial in 2; fixed widths, so no two (pid, serial) meet."""
    if not 0 <= pid < 16**6 or not 0 <= serial < 16**2:
        raise ValueError(f"no network tag for pid {pid}, serial {serial}")
    return f"b{pid:06x}{serial:02x}"


def ip(*args: str, timeout: float = 20) -> str:
    """Run `ip ARGS`; raise with its message when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def missing() -> str | None:
    """What this machine lacks for network namespaces (None: nothing)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2: apt-get install iproute2)"
    if os.geteuid() != 0:
        return "root (creating network namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"bqprobe{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
    except (RuntimeError, OSError) as exc:
        return f"working `ip netns` and veth links ({exc})"
    finally:
        with contextlib.suppress(RuntimeError, OSError):
            ip("netns", "del", probe)
    return None


class Host:
    """One namespace on the bridge: an address, a link that can be cut, its processes."""

    def __init__(self, network: Network, name: str, number: int) -> None:
        self.network = network
        self.ns = f"{network.tag}-{name}"
        self.address = f"{SUBNET}.{number}"
        self.link = f"{network.tag}{name}"[:15]  # the bridge side (interface names: 15 chars)
        self.procs: list[subprocess.Popen[bytes]] = []
        inner = f"{self.link[:13]}i"
        ip("netns", "add", self.ns)
        self.network.namespaces.append(self.ns)
        ip("-n", self.ns, "link", "set", "lo", "up")
        bridge = network.bridge_ns
        ip("-n", bridge, "link", "add", self.link, "type", "veth", "peer", "name", inner,
           "netns", self.ns)  # fmt: skip
        ip("-n", bridge, "link", "set", self.link, "master", "br0", "up")
        ip("-n", self.ns, "addr", "add", f"{self.address}/24", "dev", inner)
        ip("-n", self.ns, "link", "set", inner, "up")

    def command(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def popen(
        self, cmd: Sequence[str], env: dict[str, str], log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` on this host in a process group of its own (killed by close())."""
        proc = spawn_group(self.command(cmd), env, log)
        self.procs.append(proc)
        return proc

    def run(
        self, cmd: Sequence[str], env: dict[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` on this host to its end; its output captured."""
        return subprocess.run(
            self.command(cmd), env=env, capture_output=True, text=True, timeout=timeout
        )

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a thread of this process that joined this host's network namespace
        (setns): the sockets it opens are the host's. Its exception is raised here."""
        box: list[T] = []
        errors: list[BaseException] = []

        def inside() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.ns}")
                finally:
                    os.close(fd)
                box.append(fn(*args))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=inside, name=f"in-{self.ns}")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return box[0]

    def cut(self) -> None:
        """Take the host off the network (its link down); its processes live on."""
        ip("-n", self.network.bridge_ns, "link", "set", self.link, "down")

    def restore(self) -> None:
        ip("-n", self.network.bridge_ns, "link", "set", self.link, "up")

    def kill(self) -> None:
        """SIGKILL every process group this host started; reap them."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self.procs.clear()


class Network:
    """A bridge in its own namespace, and the hosts on it."""

    def __init__(self) -> None:
        self.tag = network_tag(os.getpid(), next(_serial))
        self.bridge_ns = f"{self.tag}-br"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        atexit.register(self.close)
        try:
            ip("netns", "add", self.bridge_ns)
            self.namespaces.append(self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Host:
        """A new host (short name: it goes into interface names) on the bridge."""
        host = Host(self, name, len(self.hosts) + 2)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill every host's processes, then delete every namespace (their links go with them)."""
        for host in self.hosts.values():
            host.kill()
        for ns in reversed(self.namespaces):
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                ip("netns", "del", ns)
        self.namespaces.clear()
        self.hosts.clear()

    def leftovers(self) -> list[str]:
        """This network's namespaces that still exist (none after close())."""
        listed = ip("netns", "list")
        return [line.split()[0] for line in listed.splitlines() if line.startswith(self.tag + "-")]
