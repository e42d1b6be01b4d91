"""`bgq submit` and `bgq ingest`: images in, cut-outs out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bgq import defaults
from bgq.settings import load_settings
from producer.cli_common import app, handle_errors, model_name, rembg_options

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


@app.command()
@handle_errors
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
    from producer.client import Producer

    options = rembg_options(locals())
    producer = Producer()
    job = producer.submit_data(file.read_bytes(), model_name(model, producer.settings), options)
    typer.echo(f"key:    {job.key}")
    typer.echo(f"cached: {'yes' if job.cached else 'no'}")
    dest = job.save(out or file.with_name(f"{file.stem}.out.png"), timeout=timeout)
    typer.echo(f"output: {dest}")


@app.command()
@handle_errors
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
            "--out", "-o", help="Folder or s3://BUCKET/PREFIX for the PNGs (mirrors SRC)."
        ),
    ],
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

    options = rembg_options(locals())
    settings = load_settings()
    failed = run_ingest(settings, src, out, model_name(model, settings), options, window, report)
    if failed:
        raise typer.Exit(1)
