"""The `bgq` command-line tool."""

from __future__ import annotations

import functools
import os
import signal
import time
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
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


@app.command()
@_errors
def up(
    workers: Annotated[
        int | None, typer.Option(help="Worker processes [default: BGQ_CONCURRENCY].")
    ] = None,
) -> None:
    """Run a local stack in the foreground: embedded Redis (unless BGQ_REDIS_URL) and workers."""
    from bgq.stack import LocalStack

    settings = load_settings()
    _ensure_model(settings)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = LocalStack(settings, workers=workers)
    typer.echo(f"bgq: starting Redis and {stack.workers} worker process(es)...", err=True)
    with stack:
        assert stack.worker is not None
        typer.echo(
            f"bgq: ready. broker {_sanitize(stack.url)}, store {settings.store_dir}, "
            f"{stack.workers} worker process(es). Ctrl-C stops everything.",
            err=True,
        )
        while not stopping and stack.worker.poll() is None:
            time.sleep(0.2)
        crashed = not stopping
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
    replies = celery_app.control.ping(timeout=1.0) or []
    depth = celery_app.backend.client.llen(contract.QUEUE)
    typer.echo(f"broker:      {_sanitize(url)}")
    typer.echo(f"store:       {producer.settings.store_dir}")
    typer.echo(f"queue depth: {depth} ({contract.QUEUE})")
    names = sorted(name for reply in replies for name in reply)
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
    job = producer.submit_data(
        file.read_bytes(), contract.check_model(model or producer.settings.model), options
    )
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
    try:
        name = contract.check_model(model or settings.model)
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from None
    failed = run_ingest(settings, src, out, name, options, window, report)
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
    path = models.fetch(contract.check_model(name or settings.model), settings.model_home)
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
