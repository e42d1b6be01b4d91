"""`bgq submit` and `bgq ingest`: images in, cut-outs out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bgq import contract, defaults
from bgq.connections import broker_url
from bgq.contract import BULK, INTERACTIVE, LANES
from bgq.errors import InvalidRequest, NoBroker
from bgq.options import FORMATS, Options
from bgq.settings import Settings, load_settings
from producer.catalog import is_url, url_stem
from producer.cli.common import app, handle_errors, model_name, shown_default
from producer.cli.models import ensure_model
from producer.cli.options import output_options
from producer.client import Producer

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help=f"rembg model {shown_default('BGQ_MODEL')}.")
]
LANE_HELP = "interactive (taken first) or bulk (shared fairly between runs)"


@app.command()
@handle_errors
@output_options
def submit(
    file: Annotated[str, typer.Argument(help="An image file, or an http(s):// URL to fetch.")],
    model: ModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write the result "
            + shown_default(
                "NAME.out.EXT next to FILE; for a URL, its file name's stem in the current folder"
            )
            + ".",
        ),
    ] = None,
    *,
    options: Options,  # the output flags: producer/cli/options.py
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the result.")
    ] = defaults.JOB_TIMEOUT,
    lane: Annotated[str, typer.Option(help=f"The job's lane: {LANE_HELP}.")] = INTERACTIVE,
) -> None:
    """Submit one image (a file or a URL), wait for it, and write the result."""
    producer = Producer()
    lane = check_lane_option(lane)
    data, default_out = read_input(file, options.format, producer.settings)
    job = producer.submit_data(data, model_name(model, producer.settings), options, lane=lane)
    typer.echo(f"key:    {job.key}")
    typer.echo(f"cached: {'yes' if job.cached else 'no'}")
    dest = job.save(out or default_out, timeout=timeout)
    typer.echo(f"output: {dest}")


def check_lane_option(lane: str) -> str:
    """--lane's value, or a usage error (exit 2) naming the lanes."""
    if lane not in LANES:
        raise typer.BadParameter(f"must be one of {', '.join(LANES)}", param_hint="'--lane'")
    return lane


def read_input(source: str, fmt: str, settings: Settings) -> tuple[bytes, Path]:
    """The bytes of a file or an http(s) URL, and the default output path for them."""
    ext = FORMATS[fmt]
    if is_url(source):
        from bgq.fetch import fetch_setting_image  # httpx (~0.3 s) only to fetch a URL

        return fetch_setting_image(settings, source), Path(f"{url_stem(source)}.out{ext}")
    path = Path(source)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise typer.BadParameter(f"{source!r} {what}", param_hint="'FILE'")
    return path.read_bytes(), path.with_name(f"{path.stem}.out{ext}")


@app.command()
@handle_errors
@output_options
def ingest(
    src: Annotated[
        str,
        typer.Argument(
            help="A folder (walked recursively), a .csv/.jsonl manifest, or s3://BUCKET/PREFIX."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Folder or s3://BUCKET/PREFIX for the outputs (mirrors SRC)."
        ),
    ],
    model: ModelOpt = None,
    window: Annotated[
        int, typer.Option(min=1, help="Most jobs outstanding at once.")
    ] = defaults.INGEST_WINDOW,
    fetch_concurrency: Annotated[
        int,
        typer.Option(min=1, help="Inputs read at once (URLs fetched, objects, files)."),
    ] = defaults.FETCH_CONCURRENCY,
    report: Annotated[
        Path | None,
        typer.Option(
            help=f"JSONL report, one line per input {shown_default('OUT/bgq-report.jsonl')}."
        ),
    ] = None,
    lane: Annotated[str, typer.Option(help=f"The jobs' lane: {LANE_HELP}.")] = BULK,
    run_id: Annotated[
        str | None,
        typer.Option(
            help="The bulk run's name, which shares the bulk capacity equally with other runs "
            + shown_default("this host and SRC, so the same command resumes in the same run")
            + "."
        ),
    ] = None,
    *,
    options: Options,  # the output flags: producer/cli/options.py
) -> None:
    """Remove the backgrounds of a whole catalog; exit 1 if any input failed (see the report)."""
    from producer.ingest import run_ingest, stack_models  # httpx (~0.3 s): only for ingest

    settings = load_settings()
    model = model_name(model, settings)
    lane = check_lane_option(lane)
    if run_id is not None:
        try:
            contract.check_run(run_id)
        except InvalidRequest as exc:
            raise typer.BadParameter(str(exc), param_hint="'--run-id'") from None
    try:
        broker_url(settings)
    except NoBroker:  # an embedded stack will start: its worker's weights first, clearly
        ensure_model(settings, stack_models(settings, model))
    failed = run_ingest(
        settings,
        src,
        out,
        model,
        options,
        window,
        report,
        fetch_concurrency=fetch_concurrency,
        lane=lane,
        run_id=run_id,
    )
    if failed:
        raise typer.Exit(1)
