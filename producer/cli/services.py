"""The long-running commands: a local stack, workers, the API, Flower, the exporter, beat."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Annotated

import typer

from bgq import contract, defaults, quotas
from bgq.connections import broker_url
from bgq.errors import ConfigError
from bgq.lane_stats import Snapshot, lane_stats
from bgq.lanes import Node
from bgq.settings import load_settings
from bgq.stack import LocalStack, flower_command, flower_env, worker_command
from bgq.store import open_store
from bgq.units import format_duration
from bgq.urls import safe_url
from producer.cli.common import app, check_store, handle_errors, shown_default
from producer.cli.models import ensure_model
from producer.client import Producer

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    event = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return event


@app.command()
@handle_errors
def up(
    workers: Annotated[
        int | None, typer.Option(help=f"Worker processes {shown_default('BGQ_CONCURRENCY')}.")
    ] = None,
    flower: Annotated[bool, typer.Option(help="Also run Flower on 127.0.0.1.")] = False,
    flower_port: Annotated[int, typer.Option(help="Flower's port.")] = defaults.FLOWER_PORT,
) -> None:
    """Run a local stack in the foreground: embedded Redis (unless BGQ_REDIS_URL) and workers."""
    settings = load_settings()
    ensure_model(settings)
    check_store(settings)
    stopping = stop_on_signals()
    stack = LocalStack(settings, workers=workers, flower_port=flower_port if flower else None)
    typer.echo(f"bgq: starting Redis and {stack.workers} worker process(es)...", err=True)
    with stack:
        assert stack.worker is not None
        typer.echo(
            f"bgq: ready. broker {safe_url(stack.url)}, store {open_store(settings).url}, "
            f"{stack.workers} worker process(es). Ctrl-C stops everything.",
            err=True,
        )
        if flower:
            typer.echo(f"bgq: Flower on http://127.0.0.1:{flower_port}/", err=True)
        while not stopping.is_set() and stack.worker.poll() is None:
            stopping.wait(0.2)
        crashed = not stopping.is_set()
        typer.echo(
            f"bgq: stopping: running jobs get up to {settings.shutdown_grace:g} s to finish "
            "(Ctrl-C again hands them back now)...",
            err=True,
        )
        for signum in (signal.SIGINT, signal.SIGTERM):  # the second one: cut the grace short
            signal.signal(signum, lambda *_: stack.hurry())
    if crashed:
        raise ConfigError("the worker exited unexpectedly; everything was stopped")
    typer.echo("bgq: stopped.", err=True)


@app.command()
@handle_errors
def status(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object (docs/kubernetes.md names its fields).")
    ] = False,
) -> None:
    """Print the broker, the store, the lanes (jobs waiting and running, the oldest wait), the
    bulk runs waiting, the models (workers, jobs) and the workers online with their pool
    processes; exit 1 if none is up."""
    producer = Producer()
    producer.store.check()
    celery_app = producer.app
    client = celery_app.backend.client
    names = producer.workers_online()
    snapshot = lane_stats(client, time.time())
    depths = snapshot.queues  # u2netp's queues, and those of each model with jobs or workers
    broker, store = safe_url(celery_app.conf.broker_url), producer.store.url
    if as_json:
        typer.echo(json.dumps(status_document(broker, store, depths, snapshot, names), indent=2))
    else:
        queued = ", ".join(f"{n} ({queue})" for queue, n in depths.items())
        typer.echo(f"broker:      {broker}")
        typer.echo(f"store:       {store}")
        typer.echo(f"queue depth: {queued}")
        for line in [*lane_lines(snapshot), *model_lines(snapshot)]:
            typer.echo(line)
        typer.echo(worker_lines(names, snapshot))
    if not names:
        raise typer.Exit(1)


def status_document(
    broker: str, store: str, depths: dict[str, int], snapshot: Snapshot, names: list[str]
) -> dict[str, object]:
    """`bgq status --json`: stable field names, as docs/kubernetes.md documents them."""
    lanes = {
        lane: {
            "waiting": stats.waiting,
            "running": stats.running,
            "oldest_wait_seconds": stats.oldest,
            "workers": stats.workers,
            "pool_processes": stats.processes,
        }
        for lane, stats in snapshot.lanes.items()
    }
    nodes = {}
    for name in names:
        served, processes, models = snapshot.workers.get(name, Node([], 0, []))
        nodes[name] = {"lanes": served, "pool_processes": processes, "models": models}
    return {
        "broker": broker,
        "store": store,
        "queues": depths,
        "lanes": lanes,
        "bulk_runs": snapshot.runs,
        "workers_online": len(names),
        "workers": nodes,
        "models": {
            model: {
                "workers": stats.workers,
                "pool_processes": stats.processes,
                "waiting": stats.waiting,
                "running": stats.running,
            }
            for model, stats in snapshot.models.items()
        },
    }


STATUS_RUNS = 5  # bulk runs `bgq status` names, the most jobs waiting first


def lane_lines(snapshot: Snapshot) -> list[str]:
    """`bgq status`'s lines for each lane, and the bulk runs waiting to be let in."""
    lines = []
    for lane, stats in snapshot.lanes.items():
        line = f"{lane + ':':<12} {stats.waiting} waiting, {stats.running} running"
        if stats.oldest is not None:
            line += f", the oldest for {format_duration(stats.oldest)}"
        if stats.waiting and not stats.processes:
            line += " (no worker consumes this lane)"
        lines.append(line)
    runs = sorted(snapshot.runs.items(), key=lambda item: (-item[1], item[0]))
    named = ", ".join(f"{run} ({count})" for run, count in runs[:STATUS_RUNS])
    more = f" and {len(runs) - STATUS_RUNS} more" if len(runs) > STATUS_RUNS else ""
    lines.append(
        f"bulk runs:   {len(runs)} waiting their turn" + (f": {named}{more}" if runs else "")
    )
    return lines


def model_lines(snapshot: Snapshot) -> list[str]:
    """`bgq status`'s line for each model with workers or jobs (bulk run lists mix models:
    their jobs count in the bulk lane, not here); jobs that no live worker serves are flagged."""
    lines: list[str] = []
    for model, stats in snapshot.models.items():
        waiting, running = sum(stats.waiting.values()), sum(stats.running.values())
        if not (stats.workers or waiting or running):
            continue
        lanes = ", ".join(f"{count} {lane}" for lane, count in stats.waiting.items())
        workers = f"{stats.workers} worker" + ("" if stats.workers == 1 else "s")
        line = f"{model}: {workers}, {pool_processes(stats.processes)}; "
        line += f"{waiting} waiting ({lanes}), {running} running"
        if waiting and not stats.workers:
            line += f" (no live worker serves {model}: start one with BGQ_MODELS={model})"
        lines.append(("models:      " if not lines else " " * 13) + line)
    return lines or ["models:      none served, no jobs waiting"]


def pool_processes(count: int) -> str:
    """`1 pool process`, `2 pool processes`."""
    return f"{count} pool process" + ("" if count == 1 else "es")


def worker_lines(names: list[str], snapshot: Snapshot) -> str:
    """`workers: 1 online, 2 pool processes (interactive, bulk)`, then a line per worker."""
    groups: dict[str, int] = {}
    nodes = []
    for name in names:
        served, processes, _ = snapshot.workers.get(name, Node([], 0, []))
        if not served:  # webhooks or maintenance only
            nodes.append(f"\n  {name}: no image queue")
            continue
        lane_list = ", ".join(served)
        groups[lane_list] = groups.get(lane_list, 0) + processes
        nodes.append(f"\n  {name}: {pool_processes(processes)} ({lane_list})")
    pools = "".join(f", {pool_processes(n)} ({group})" for group, n in groups.items())
    return f"workers:     {len(names)} online{pools}" + "".join(nodes)


@app.command()
@handle_errors
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = defaults.API_HOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.")] = defaults.API_PORT,
    key_ids: Annotated[
        bool,
        typer.Option(
            "--key-ids",
            help="Print the short id of each BGQ_API_KEYS key, by position (BGQ_API_LIMITS "
            "names keys by these ids), and exit.",
        ),
    ] = False,
) -> None:
    """Serve the HTTP API (FastAPI on uvicorn) and the web page at /; schema at /openapi.json."""
    if key_ids:
        for position, key in enumerate(load_settings().api_key_list, start=1):
            typer.echo(f"{position}  {quotas.key_id(key)}")
        return
    import uvicorn  # FastAPI and uvicorn only for `bgq api` (~0.5 s at every other command)

    from producer.api import create_app  # the same: it imports FastAPI

    settings = load_settings()
    broker_url(settings)  # fail here, clearly, when there is no broker
    check_store(settings)
    if host not in LOOPBACK and not settings.api_key_list:
        typer.echo(
            f"bgq: warning: listening on {host} with no BGQ_API_KEYS: anyone who can reach it "
            "can submit jobs",
            err=True,
        )
    uvicorn.run(create_app(settings), host=host, port=port, proxy_headers=True)


@app.command("flower")
@handle_errors
def flower_cmd(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = defaults.FLOWER_PORT,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run Flower on the configured broker; login from BGQ_FLOWER_BASIC_AUTH (user:password)."""
    settings = load_settings()
    broker_url(settings)
    if address not in LOOPBACK and not settings.flower_basic_auth:
        raise ConfigError(
            f"refusing to serve Flower on {address} without a login: set "
            "BGQ_FLOWER_BASIC_AUTH=user:password (or listen on 127.0.0.1)"
        )
    cmd = flower_command(port, address)
    env = {**os.environ, **flower_env(settings)}
    os.execve(cmd[0], cmd, env)


@app.command()
@handle_errors
def exporter(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.")] = defaults.EXPORTER_PORT,
) -> None:
    """Serve bgq's Prometheus metrics (queues, cache, results, stage times, store) on /metrics."""
    from bgq.exporter import Exporter  # prometheus_client only for `bgq exporter`

    settings = load_settings()
    stopping = stop_on_signals()
    server = Exporter(settings, host, port)
    typer.echo(f"bgq: exporter on http://{host}:{server.port}/metrics", err=True)
    try:
        stopping.wait()
    finally:
        server.stop()


@app.command()
@handle_errors
def beat() -> None:
    """Run Celery beat with bgq's schedule (the cache prune every hour, run by the workers)."""
    settings = load_settings()
    broker_url(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel", "INFO",
        "--schedule", str(settings.run_dir / "celerybeat-schedule"),
    ]  # fmt: skip
    os.execv(cmd[0], cmd)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def worker(
    ctx: typer.Context,
    models: Annotated[
        str | None,
        typer.Option(
            help="Models this worker serves, comma-separated (sets BGQ_MODELS; default: "
            "BGQ_MODEL): each pool process loads each once at start, and the worker takes only "
            "their jobs."
        ),
    ] = None,
    lanes: Annotated[
        str | None,
        typer.Option(
            help="Serve only these lanes (interactive, bulk; comma-separated) of its models: "
            "their queues, and no webhook deliveries or prune. Default: every bgq queue."
        ),
    ] = None,
) -> None:
    """Start a Celery worker with bgq's defaults; extra arguments go to `celery worker`
    (`-Q`/`--queues` names queues outright: `bgq@<model>` and `bgq.bulk@<model>` serve a
    model other than u2netp, whose queues are `bgq` and `bgq.bulk`)."""
    settings = load_settings() if models is None else load_settings(models=models)
    broker_url(settings)  # fail here, clearly, when there is no broker
    args = list(ctx.args)
    queues = consumed_queues(args)
    if lanes is not None:
        if queues is not None:
            raise ConfigError("--lanes and --queues both name the queues: give one")
        queues = lane_queues(lanes, settings.served_models)
        args += ["--queues", ",".join(queues)]
    served = settings.served_models if queues is None else queue_models(queues)
    ensure_model(settings, served)  # none for a worker of webhooks or maintenance only
    check_store(settings)
    named = any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in args)
    cmd = worker_command(settings.concurrency, "bgq@%h", *args)
    if named:  # the caller's node name wins: drop bgq's default
        at = cmd.index("--hostname")
        del cmd[at : at + 2]
    env = dict(os.environ)
    if settings.models:
        env["BGQ_MODELS"] = settings.models  # --models, checked, for the worker's settings
    os.execve(cmd[0], cmd, env)


def lane_queues(lanes: str, models: list[str]) -> set[str]:
    """`--lanes interactive,bulk`: the image queues of those lanes for each of `models`."""
    names = [lane.strip() for lane in lanes.split(",") if lane.strip()]
    unknown = [lane for lane in names if lane not in contract.LANES]
    if unknown or not names:
        raise ConfigError(f"--lanes: name some of {', '.join(contract.LANES)}, not {lanes!r}")
    return {contract.image_queue(lane, model) for lane in names for model in models}


def queue_models(queues: set[str]) -> list[str]:
    """The models whose image queues are among `queues` (what a worker of them loads)."""
    routes = [contract.queue_route(queue) for queue in sorted(queues)]
    return sorted({route[1] for route in routes if route is not None})


def consumed_queues(args: list[str]) -> set[str] | None:
    """The queues a `celery worker` command line names (-Q/--queues), or None: all of bgq's."""
    for i, arg in enumerate(args):
        if arg in ("-Q", "--queues") and i + 1 < len(args):
            return set(args[i + 1].split(","))
        if arg.startswith("--queues="):
            return set(arg.split("=", 1)[1].split(","))
        if arg.startswith("-Q") and len(arg) > 2:
            return set(arg[2:].split(","))
    return None
