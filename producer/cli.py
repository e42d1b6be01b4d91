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
from bgq.errors import BgqError, ConfigError, InvalidImage, NoBroker
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


@app.command()
@_errors
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="rembg model [default: BGQ_MODEL].")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write the PNG [default: NAME.out.png next to FILE]."
        ),
    ] = None,
    alpha_matting: Annotated[bool, typer.Option("--alpha-matting", "-a")] = False,
    alpha_matting_foreground_threshold: Annotated[
        int, typer.Option("--alpha-matting-foreground-threshold", "-af")
    ] = 240,
    alpha_matting_background_threshold: Annotated[
        int, typer.Option("--alpha-matting-background-threshold", "-ab")
    ] = 10,
    alpha_matting_erode_size: Annotated[
        int, typer.Option("--alpha-matting-erode-size", "-ae")
    ] = 10,
    only_mask: Annotated[bool, typer.Option("--only-mask", "-om")] = False,
    post_process_mask: Annotated[bool, typer.Option("--post-process-mask", "-ppm")] = False,
    bgcolor: Annotated[
        str | None, typer.Option("--bgcolor", "-bgc", help="Background colour R,G,B,A.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the result.")
    ] = defaults.JOB_TIMEOUT,
) -> None:
    """Submit one image, wait for it, and write the PNG."""
    from bgq.store import atomic_write
    from producer.client import Producer

    options: dict[str, Any] = {
        "alpha_matting": alpha_matting,
        "alpha_matting_foreground_threshold": alpha_matting_foreground_threshold,
        "alpha_matting_background_threshold": alpha_matting_background_threshold,
        "alpha_matting_erode_size": alpha_matting_erode_size,
        "only_mask": only_mask,
        "post_process_mask": post_process_mask,
        "bgcolor": bgcolor,
    }
    job = Producer().submit(file, model=model, **options)
    typer.echo(f"key:    {job.key}")
    typer.echo(f"cached: {'yes' if job.cached else 'no'}")
    result = job.wait(timeout=timeout)
    dest = out or file.with_name(f"{file.stem}.out.png")
    atomic_write(dest, result.read_bytes())
    typer.echo(f"output: {dest}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def worker(ctx: typer.Context) -> None:
    """Start a Celery worker with bgq's defaults; extra arguments go to `celery worker`."""
    from bgq.stack import worker_command

    settings = load_settings()
    settings.broker_url()  # fail here, clearly, when there is no broker
    _ensure_model(settings)
    hostname = f"bgq-{os.getpid()}@%h"
    cmd = worker_command(settings.concurrency, hostname, *ctx.args)
    os.execv(cmd[0], cmd)


@app.command()
@_errors
def demo(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Images or folders [default: ./samples].")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs.")] = Path("out"),
    workers: Annotated[
        int | None, typer.Option(help="Worker processes when a stack is started.")
    ] = None,
) -> None:
    """Remove the background of a few images through the queue, starting a stack if none runs."""
    from bgq.stack import LocalStack
    from bgq.store import atomic_write
    from producer.client import Producer

    settings = load_settings()
    files = _image_files(paths or [Path("samples")])
    _ensure_model(settings)
    stack = None
    started = time.monotonic()
    failed = 0
    try:
        try:
            jobs = Producer(settings).submit_many(files)
        except NoBroker:  # something needs computing and nothing runs: start a stack for it
            stack = LocalStack(settings, workers=workers, log=settings.run_dir / "demo-worker.log")
            typer.echo(
                f"bgq: starting a local stack ({stack.workers} worker processes)...", err=True
            )
            stack.start()
            settings = settings.model_copy(update={"redis_url": stack.url})
            jobs = Producer(settings).submit_many(files)
        for job in jobs:
            assert job.source is not None
            try:
                result = job.wait(timeout=defaults.JOB_TIMEOUT)
            except BgqError as exc:
                failed += 1
                typer.echo(f"FAILED  {job.source}: {exc}")
                continue
            dest = out / f"{Path(job.source).stem}.png"
            atomic_write(dest, result.read_bytes())
            typer.echo(f"{'cached' if job.cached else 'done  '}  {job.source} -> {dest}")
        typer.echo(
            f"{len(files) - failed} of {len(files)} images in {time.monotonic() - started:.1f}s; "
            f"PNGs in {out.resolve()}"
        )
    finally:
        if stack is not None:
            stack.stop()
    if failed:
        raise typer.Exit(1)


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


def _image_files(paths: list[Path]) -> list[Path]:
    """Files named directly, plus the image files directly inside named folders (by content)."""
    from bgq.imageinfo import probe

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted(p for p in path.iterdir() if p.is_file()):
                try:
                    probe(candidate.read_bytes(), float("inf"))
                except InvalidImage:
                    typer.echo(f"skipped {candidate}: not an image", err=True)
                    continue
                except BgqError:
                    pass  # an image bgq will refuse: submitted, so that it is reported
                files.append(candidate)
        elif path.exists():
            files.append(path)
        else:
            raise ConfigError(f"no such file or folder: {path}")
    return files


def main() -> None:
    """Entry point of the `bgq` console script."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process is bgq's: BGQ_MAX_MEGAPIXELS is the limit
    app()


if __name__ == "__main__":
    main()
