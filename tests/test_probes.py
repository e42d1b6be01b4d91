"""What Kubernetes and an autoscaler ask of a worker: `bgq probe ready|alive` and
`bgq status --json`, on real prefork workers and a real Redis."""

from __future__ import annotations

import json
import os
import signal
import time

from bgq import defaults, lanes
from bgq.contract import BULK, INTERACTIVE
from bgq.lane_stats import LaneStats, ModelStats, Snapshot
from bgq.lanes import Node
from bgq.process import free_port
from bgq.stack import LocalStack
from producer.cli.services import status_document
from tests.helpers import bgq, wait_for


def stack_env(stack: LocalStack, env: dict[str, str]) -> dict[str, str]:
    """The stack's broker and BGQ_HOME (where its worker writes its beat file)."""
    return {**env, "BGQ_REDIS_URL": stack.url, "BGQ_HOME": str(stack.settings.home)}


def test_status_document_fields() -> None:
    snapshot = Snapshot(
        lanes={
            INTERACTIVE: LaneStats(waiting=1, running=2, oldest=3.5, workers=1, processes=4),
            BULK: LaneStats(waiting=300, running=4, oldest=None, workers=1, processes=4),
        },
        runs={"catalog": 296},
        workers={"a@h": Node([INTERACTIVE, BULK], 4, ["u2netp", "u2net"])},
        models={
            "u2net": ModelStats({INTERACTIVE: 1, BULK: 0}, {INTERACTIVE: 0, BULK: 2}, 1, 4),
        },
    )
    document = status_document("redis://r:6379/0", "/s", {"bgq": 1, "bgq.bulk": 4}, snapshot,
                               ["a@h", "hooks@h"])  # fmt: skip
    assert document == {
        "broker": "redis://r:6379/0",
        "store": "/s",
        "queues": {"bgq": 1, "bgq.bulk": 4},
        "lanes": {
            "interactive": {
                "waiting": 1,
                "running": 2,
                "oldest_wait_seconds": 3.5,
                "workers": 1,
                "pool_processes": 4,
            },
            "bulk": {
                "waiting": 300,
                "running": 4,
                "oldest_wait_seconds": None,
                "workers": 1,
                "pool_processes": 4,
            },
        },
        "bulk_runs": {"catalog": 296},
        "workers_online": 2,
        "workers": {
            "a@h": {
                "lanes": ["interactive", "bulk"],
                "pool_processes": 4,
                "models": ["u2netp", "u2net"],
            },
            "hooks@h": {"lanes": [], "pool_processes": 0, "models": []},
        },
        "models": {
            "u2net": {
                "workers": 1,
                "pool_processes": 4,
                "waiting": {"interactive": 1, "bulk": 0},
                "running": {"interactive": 0, "bulk": 2},
            },
        },
    }
    json.dumps(document)  # all of it is JSON


def test_status_json_on_a_running_worker(stack: LocalStack, env: dict[str, str]) -> None:
    done = bgq("status", "--json", env=stack_env(stack, env))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["workers_online"] == 1
    assert document["workers"] == {
        stack.hostname: {
            "lanes": ["interactive", "bulk"],
            "pool_processes": 2,
            "models": ["u2netp"],
        }
    }
    assert document["models"]["u2netp"]["workers"] == 1
    assert document["models"]["u2netp"]["pool_processes"] == 2
    assert set(document["queues"]) == {"bgq", "bgq.bulk"}
    for lane in ("interactive", "bulk"):
        assert document["lanes"][lane]["pool_processes"] == 2
        assert document["lanes"][lane]["workers"] == 1
        assert {"waiting", "running", "oldest_wait_seconds"} <= set(document["lanes"][lane])


def test_probe_ready_is_the_workers_live_entry(stack: LocalStack, env: dict[str, str]) -> None:
    ready = bgq("probe", "ready", "--node", stack.hostname, env=stack_env(stack, env))
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "2 pool process(es) serving interactive, bulk" in ready.stdout
    other = bgq("probe", "ready", "--node", "bgq@elsewhere", env=stack_env(stack, env))
    assert other.returncode == 1 and "no live entry in Redis" in other.stdout
    cut_off = {**stack_env(stack, env), "BGQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    unreachable = bgq("probe", "ready", "--node", stack.hostname, env=cut_off)
    assert unreachable.returncode == 1 and "cannot read Redis" in unreachable.stdout


def test_probe_alive_follows_the_main_loop_not_redis(
    stack: LocalStack, env: dict[str, str]
) -> None:
    """The beat file is fresh while the worker's main process runs; with the main process
    stopped (SIGSTOP) and its last beat older than WORKER_ALIVE_STALE, `alive` fails while
    Redis answers, and passes with Redis unreachable (no restart in a Redis outage)."""
    assert stack.worker is not None
    beat = lanes.beat_file(stack.settings.run_dir, stack.hostname)
    wait_for(beat.exists, timeout=30, what="the worker's first beat")
    alive = bgq("probe", "alive", "--node", stack.hostname, env=stack_env(stack, env))
    assert alive.returncode == 0 and "last beat" in alive.stdout, alive.stdout + alive.stderr

    os.kill(stack.worker.pid, signal.SIGSTOP)
    try:
        old = time.time() - defaults.WORKER_ALIVE_STALE - 30
        os.utime(beat, (old, old))
        stuck = bgq("probe", "alive", "--node", stack.hostname, env=stack_env(stack, env))
        assert stuck.returncode == 1, stuck.stdout + stuck.stderr
        assert "the main loop is stuck" in stuck.stdout
        cut_off = {**stack_env(stack, env), "BGQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
        outage = bgq("probe", "alive", "--node", stack.hostname, env=cut_off)
        assert outage.returncode == 0, outage.stdout + outage.stderr
        assert "Redis is unreachable" in outage.stdout
    finally:
        os.kill(stack.worker.pid, signal.SIGCONT)
    # Running again, its next beat (every WORKER_BEAT seconds) makes the file fresh.
    wait_for(lambda: beat.stat().st_mtime > old + 30, timeout=3 * defaults.WORKER_BEAT + 10,
             what="the beat after SIGCONT")  # fmt: skip
    again = bgq("probe", "alive", "--node", stack.hostname, env=stack_env(stack, env))
    assert again.returncode == 0, again.stdout


def test_probe_alive_without_a_beat_fails(env: dict[str, str]) -> None:
    done = bgq("probe", "alive", "--node", "bgq@nowhere", env=env)
    assert done.returncode == 1 and "no beat yet" in done.stdout
