"""The `bgq` command-line tool."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from bgq import contract, defaults
from bgq.contract import Options
from bgq.errors import BgqError, ConfigError, InvalidRequest
from bgq.settings import Settings, load_settings

app = typer.Typer(
    help="bgq: distributed background removal (rembg on Celery/Redis).",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")
cache_app = typer.Typer(help="The result cache (the store).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

F = TypeVar("F", bound=Callable[..., Any])


def _errors(func: F) -> F:
    """Turn bgq's errors into one line on stderr: exit 2 for setup problems, 1 otherwise."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            typer.echo(f"bgq: {exc}", err=True)
            raise typer.Exit(2) from None
        except (BgqError, OSError) as exc:
            typer.echo(f"bgq: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _sanitize(url: str) -> str:
    from bgq.connections import safe_url

    return safe_url(url)


@app.command()
@_errors
def up(
    workers: Annotated[
        int | None, typer.Option(help="Worker processes [default: BGQ_CONCURRENCY].")
    ] = None,
    flower: Annotated[bool, typer.Option(help="Also run Flower on 127.0.0.1.")] = False,
    flower_port: Annotated[int, typer.Option(help="Flower's port.")] = defaults.FLOWER_PORT,
) -> None:
    """Run a local stack in the foreground: embedded Redis (unless BGQ_REDIS_URL) and workers."""
    from bgq.stack import LocalStack

    settings = load_settings()
    _ensure_model(settings)
    stopping = _stop_on_signals()
    stack = LocalStack(settings, workers=workers, flower_port=flower_port if flower else None)
    typer.echo(f"bgq: starting Redis and {stack.workers} worker process(es)...", err=True)
    with stack:
        assert stack.worker is not None
        typer.echo(
            f"bgq: ready. broker {_sanitize(stack.url)}, store {settings.store_dir}, "
            f"{stack.workers} worker process(es). Ctrl-C stops everything.",
            err=True,
        )
        if flower:
            typer.echo(f"bgq: Flower on http://127.0.0.1:{flower_port}/", err=True)
        while not stopping.is_set() and stack.worker.poll() is None:
            stopping.wait(0.2)
        crashed = not stopping.is_set()
        typer.echo("bgq: stopping...", err=True)
    if crashed:
        raise ConfigError("the worker exited unexpectedly; everything was stopped")
    typer.echo("bgq: stopped.", err=True)


@app.command()
@_errors
def status() -> None:
    """Print the broker URL, the workers online and the queue depth; exit 1 if no worker is up."""
    from producer.client import Producer

    producer = Producer()
    celery_app = producer.app
    url = celery_app.conf.broker_url
    names = producer.workers_online()
    depth = celery_app.backend.client.llen(contract.QUEUE)
    typer.echo(f"broker:      {_sanitize(url)}")
    typer.echo(f"store:       {producer.settings.store_dir}")
    typer.echo(f"queue depth: {depth} ({contract.QUEUE})")
    typer.echo(f"workers:     {len(names)} online" + "".join(f"\n  {n}" for n in names))
    if not names:
        raise typer.Exit(1)


# rembg's own option flags, shared by `submit` and `ingest`.
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="rembg model [default: BGQ_MODEL].")
]
AlphaMattingOpt = Annotated[bool, typer.Option("--alpha-matting", "-a")]
ForegroundOpt = Annotated[int, typer.Option("--alpha-matting-foreground-threshold", "-af")]
BackgroundOpt = Annotated[int, typer.Option("--alpha-matting-background-threshold", "-ab")]
ErodeOpt = Annotated[int, typer.Option("--alpha-matting-erode-size", "-ae")]
OnlyMaskOpt = Annotated[bool, typer.Option("--only-mask", "-om")]
PostProcessOpt = Annotated[bool, typer.Option("--post-process-mask", "-ppm")]
BgcolorOpt = Annotated[
    str | None, typer.Option("--bgcolor", "-bgc", help="Background colour R,G,B,A.")
]


def _model(name: str | None, settings: Settings) -> str:
    """The model a command runs (--model, else BGQ_MODEL); an unknown one is a usage error."""
    try:
        return contract.check_model(name or settings.model)
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from None


def _rembg_options(values: dict[str, Any]) -> Options:
    """The rembg options among a command's arguments, validated (a bad one is a usage error)."""
    fields = Options.model_fields.keys()
    try:
        return Options.parse({k: v for k, v in values.items() if k in fields})
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from None


@app.command()
@_errors
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    model: ModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write the PNG [default: NAME.out.png next to FILE]."
        ),
    ] = None,
    alpha_matting: AlphaMattingOpt = False,
    alpha_matting_foreground_threshold: ForegroundOpt = 240,
    alpha_matting_background_threshold: BackgroundOpt = 10,
    alpha_matting_erode_size: ErodeOpt = 10,
    only_mask: OnlyMaskOpt = False,
    post_process_mask: PostProcessOpt = False,
    bgcolor: BgcolorOpt = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the result.")
    ] = defaults.JOB_TIMEOUT,
) -> None:
    """Submit one image, wait for it, and write the PNG."""
    from bgq.store import atomic_write
    from producer.client import Producer

    options = _rembg_options(locals())
    producer = Producer()
    job = producer.submit_data(file.read_bytes(), _model(model, producer.settings), options)
    typer.echo(f"key:    {job.key}")
    typer.echo(f"cached: {'yes' if job.cached else 'no'}")
    result = job.wait(timeout=timeout)
    dest = out or file.with_name(f"{file.stem}.out.png")
    atomic_write(dest, result.read_bytes())
    typer.echo(f"output: {dest}")


@app.command()
@_errors
def ingest(
    src: Annotated[
        Path, typer.Argument(help="A folder (walked recursively) or a .csv/.jsonl manifest.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs (mirrors SRC).")],
    model: ModelOpt = None,
    window: Annotated[
        int, typer.Option(min=1, help="Most jobs outstanding at once.")
    ] = defaults.INGEST_WINDOW,
    report: Annotated[
        Path | None,
        typer.Option(help="JSONL report, one line per input [default: OUT/bgq-report.jsonl]."),
    ] = None,
    alpha_matting: AlphaMattingOpt = False,
    alpha_matting_foreground_threshold: ForegroundOpt = 240,
    alpha_matting_background_threshold: BackgroundOpt = 10,
    alpha_matting_erode_size: ErodeOpt = 10,
    only_mask: OnlyMaskOpt = False,
    post_process_mask: PostProcessOpt = False,
    bgcolor: BgcolorOpt = None,
) -> None:
    """Remove the backgrounds of a whole catalog; exit 1 if any input failed (see the report)."""
    from producer.ingest import run_ingest

    options = _rembg_options(locals())
    settings = load_settings()
    failed = run_ingest(settings, src, out, _model(model, settings), options, window, report)
    if failed:
        raise typer.Exit(1)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@app.command()
@_errors
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = defaults.API_HOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.")] = defaults.API_PORT,
) -> None:
    """Serve the HTTP API (FastAPI on uvicorn); docs at /docs, schema at /openapi.json."""
    import uvicorn

    from producer.api import create_app

    settings = load_settings()
    settings.broker_url()  # fail here, clearly, when there is no broker
    if host not in LOOPBACK and not settings.api_key_list:
        typer.echo(
            f"bgq: warning: listening on {host} with no BGQ_API_KEYS: anyone who can reach it "
            "can submit jobs",
            err=True,
        )
    uvicorn.run(create_app(settings), host=host, port=port, proxy_headers=True)


@app.command("flower")
@_errors
def flower_cmd(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = defaults.FLOWER_PORT,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run Flower on the configured broker; login from BGQ_FLOWER_BASIC_AUTH (user:password)."""
    from bgq.stack import flower_command, flower_env

    settings = load_settings()
    settings.broker_url()
    if address not in LOOPBACK and not settings.flower_basic_auth:
        raise ConfigError(
            f"refusing to serve Flower on {address} without a login: set "
            "BGQ_FLOWER_BASIC_AUTH=user:password (or listen on 127.0.0.1)"
        )
    cmd = flower_command(port, address)
    env = {**os.environ, **flower_env(settings)}
    os.execve(cmd[0], cmd, env)


@app.command()
@_errors
def exporter(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.")] = defaults.EXPORTER_PORT,
) -> None:
    """Serve bgq's Prometheus metrics (queues, cache, results, stage times, store) on /metrics."""
    from bgq.exporter import Exporter

    settings = load_settings()
    stopping = _stop_on_signals()
    server = Exporter(settings, host, port)
    typer.echo(f"bgq: exporter on http://{host}:{server.port}/metrics", err=True)
    try:
        stopping.wait()
    finally:
        server.stop()


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    event = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return event


@app.command()
@_errors
def beat() -> None:
    """Run Celery beat with bgq's schedule (the cache prune every hour, run by the workers)."""
    settings = load_settings()
    settings.broker_url()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel", "INFO",
        "--schedule", str(settings.run_dir / "celerybeat-schedule"),
    ]  # fmt: skip
    os.execv(cmd[0], cmd)


@cache_app.command("stats")
@_errors
def cache_stats() -> None:
    """Entries and bytes in the store, and the cluster's cache hit rate."""
    from bgq import cache
    from bgq.units import format_size

    settings = load_settings()
    stats = cache.store_stats(settings.store_dir)
    typer.echo(f"store:    {settings.store_dir}")
    typer.echo(f"results:  {stats.results} ({format_size(stats.result_bytes)})")
    typer.echo(f"inputs:   {stats.inputs} ({format_size(stats.input_bytes)})")
    client = cache.cluster_redis(settings)
    if client is None:
        typer.echo("hit rate: unknown (no Redis running for this BGQ_HOME)")
        return
    with client:
        raw = client.hgetall(contract.STATS_KEY)
    counts = {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
    hits, misses = counts.get("cache_hits", 0), counts.get("cache_misses", 0)
    rate = f"{hits / (hits + misses):.1%}" if hits + misses else "n/a"
    typer.echo(f"hit rate: {rate} ({hits} hits, {misses} misses)")
    typer.echo(
        "results:  "
        + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("computed", "skipped", "failed"))
    )


@cache_app.command("prune")
@_errors
def cache_prune(
    max_age: Annotated[
        str | None,
        typer.Option(
            help="Drop results unused for this long, e.g. 7d [default: BGQ_CACHE_MAX_AGE]."
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            help="Then drop the LRU ones down to this, e.g. 20G [default: BGQ_CACHE_MAX_SIZE]."
        ),
    ] = None,
    keep_inputs: Annotated[
        bool | None,
        typer.Option(
            "--keep-inputs/--drop-inputs", help="Keep input blobs [default: BGQ_CACHE_KEEP_INPUTS]."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only report what would go.")] = False,
) -> None:
    """Delete least-recently-used results (never in-flight or used in the last minute)."""
    from bgq import cache
    from bgq.units import format_size, parse_duration, parse_size

    settings = load_settings()
    try:
        age = parse_duration(max_age) if max_age is not None else settings.cache_max_age
        size = parse_size(max_size) if max_size is not None else settings.cache_max_size
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    keep = settings.cache_keep_inputs if keep_inputs is None else keep_inputs
    client = cache.cluster_redis(settings)
    with cache.prune_lock(client) as held:
        if not held:
            raise ConfigError("another prune is running (lock bgq:prune-lock); try later")
        report = cache.prune(settings.store_dir, client, age, size, keep, dry_run)
    if client is not None:
        client.close()
    verb = "would remove" if dry_run else "removed"
    typer.echo(
        f"{verb} {report.removed} result(s) ({format_size(report.removed_bytes)}), "
        f"{report.inputs_removed} input(s) ({format_size(report.inputs_removed_bytes)}), "
        f"{report.temporaries_removed} temporary file(s)"
    )
    typer.echo(
        f"kept {report.kept} result(s) ({format_size(report.kept_bytes)}): "
        f"{report.skipped_recent} used in the last minute, {report.skipped_in_flight} in flight"
    )
    for note in report.notes:
        typer.echo(f"note: {note}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def worker(ctx: typer.Context) -> None:
    """Start a Celery worker with bgq's defaults; extra arguments go to `celery worker`."""
    from bgq.stack import worker_command

    settings = load_settings()
    settings.broker_url()  # fail here, clearly, when there is no broker
    _ensure_model(settings)
    named = any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in ctx.args)
    cmd = worker_command(settings.concurrency, "bgq@%h", *ctx.args)
    if named:  # the caller's node name wins: drop bgq's default
        at = cmd.index("--hostname")
        del cmd[at : at + 2]
    os.execv(cmd[0], cmd)


@models_app.command("fetch")
@_errors
def models_fetch(
    name: Annotated[str | None, typer.Argument(help="Model name [default: BGQ_MODEL].")] = None,
) -> None:
    """Put a model's weights where rembg looks for them (under BGQ_HOME) and verify them."""
    from workers import models

    settings = load_settings()
    path = models.fetch(_model(name, settings), settings.model_home)
    typer.echo(f"{name or settings.model}: {path}")


def _ensure_model(settings: Settings) -> None:
    from workers import models

    models.fetch(settings.model, settings.model_home)


def main() -> None:
    """Entry point of the `bgq` console script."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process is bgq's: BGQ_MAX_MEGAPIXELS is the limit
    app()


if __name__ == "__main__":
    main()
