"""`bgq probe ready|alive`: a worker's readiness and liveness, for Kubernetes probes (exit 0 or 1).

Run in the worker's own container (its node name is `bgq@<hostname>` unless --node says).
- ready: the worker's main process renewed its capacity entry in Redis within WORKER_ENTRY_TTL
  seconds, so it is consuming and counted by the lanes. Fails while Redis is unreachable.
- alive: the worker's main loop touched its beat file (BGQ_HOME/run) within WORKER_ALIVE_STALE
  seconds; a staler file fails only while Redis answers. A worker cut off from Redis is not
  restarted for it: a new one could not reach Redis either, and every worker would restart at
  once in a Redis outage.
"""

from __future__ import annotations

import enum
import time
from typing import Annotated

import redis
import typer
from celery.utils.nodenames import host_format

from bgq import defaults, lanes
from bgq.connections import redis_client
from bgq.settings import Settings, load_settings
from producer.cli.common import app, handle_errors

PROBE_TIMEOUT = 3.0  # seconds for each Redis call of a probe


class Check(enum.StrEnum):
    """What `bgq probe` checks."""

    READY = "ready"
    ALIVE = "alive"


@app.command()
@handle_errors
def probe(
    check: Annotated[
        Check, typer.Argument(help="ready: its entry in Redis is live; alive: its main loop beats.")
    ],
    node: Annotated[str, typer.Option(help="The worker's node name.")] = "bgq@%h",
) -> None:
    """Check the worker in this container, for a Kubernetes probe: exit 0 if it passes, else 1."""
    settings, name = load_settings(), host_format(node)
    passed, reason = (ready if check is Check.READY else alive)(settings, name)
    typer.echo(f"bgq: {name} {check.value}: {'yes' if passed else 'no'}: {reason}")
    if not passed:
        raise typer.Exit(1)


def ready(settings: Settings, node: str) -> tuple[bool, str]:
    """Whether the node's capacity entry is live in Redis, and why."""
    try:
        live = lanes.capacity(redis_client(settings, PROBE_TIMEOUT, PROBE_TIMEOUT))
    except redis.RedisError as exc:
        return False, f"cannot read Redis: {exc}"
    if node not in live:
        return False, f"no live entry in Redis (renewed every {defaults.WORKER_BEAT} s)"
    served, processes, _ = live[node]
    return True, f"{processes} pool process(es) serving {', '.join(served) or 'no image lane'}"


def alive(settings: Settings, node: str) -> tuple[bool, str]:
    """Whether the node's main loop beats, or Redis is what is missing, and why."""
    path = lanes.beat_file(settings.run_dir, node)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"no beat yet ({path})"
    if age <= defaults.WORKER_ALIVE_STALE:
        return True, f"last beat {age:.0f} s ago"
    try:
        redis_client(settings, PROBE_TIMEOUT, PROBE_TIMEOUT).ping()
    except redis.RedisError as exc:
        return True, f"last beat {age:.0f} s ago, but Redis is unreachable ({exc}): waiting"
    return False, f"last beat {age:.0f} s ago while Redis answers: the main loop is stuck"
