"""`bgq submit` and `bgq ingest`: images in, cut-outs out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bgq import contract, defaults
from bgq.settings import Settings, load_settings
from producer.catalog import is_url, url_stem
from producer.cli.common import app, handle_errors, model_name, rembg_options

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
# How the output is shaped and encoded (checked by Options: a bad value is a usage error).
FormatOpt = Annotated[str, typer.Option("--format", help="png, webp or jpeg.")]
QualityOpt = Annotated[
    int | None, typer.Option("--quality", help="1-100 (webp, jpeg) [default: 90].")
]
CropOpt = Annotated[bool, typer.Option("--crop", help="Crop to the subject.")]
CropMarginOpt = Annotated[
    str, typer.Option("--crop-margin", help="Margin around the cropped subject: 20px or 5%.")
]
CanvasOpt = Annotated[
    str | None, typer.Option("--canvas", help="Place the subject on a WxH canvas (1000x1000).")
]
PaddingOpt = Annotated[
    str, typer.Option("--padding", help="Space between subject and canvas edge: 20px or 5%.")
]
PositionOpt = Annotated[str, typer.Option("--position", help="center, top or bottom.")]


@app.command()
@handle_errors
def submit(
    file: Annotated[str, typer.Argument(help="An image file, or an http(s):// URL to fetch.")],
    model: ModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write the result [default: NAME.out.EXT next to FILE; for a URL, "
            "its file name's stem in the current folder].",
        ),
    ] = None,
    alpha_matting: AlphaMattingOpt = False,
    alpha_matting_foreground_threshold: ForegroundOpt = 240,
    alpha_matting_background_threshold: BackgroundOpt = 10,
    alpha_matting_erode_size: ErodeOpt = 10,
    only_mask: OnlyMaskOpt = False,
    post_process_mask: PostProcessOpt = False,
    bgcolor: BgcolorOpt = None,
    format: FormatOpt = "png",
    quality: QualityOpt = None,
    crop: CropOpt = False,
    crop_margin: CropMarginOpt = "0",
    canvas: CanvasOpt = None,
    padding: PaddingOpt = "0",
    position: PositionOpt = "center",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the result.")
    ] = defaults.JOB_TIMEOUT,
) -> None:
    """Submit one image (a file or a URL), wait for it, and write the result."""
    from producer.client import Producer

    options = rembg_options(locals())
    producer = Producer()
    data, default_out = read_input(file, options.format, producer.settings)
    job = producer.submit_data(data, model_name(model, producer.settings), options)
    typer.echo(f"key:    {job.key}")
    typer.echo(f"cached: {'yes' if job.cached else 'no'}")
    dest = job.save(out or default_out, timeout=timeout)
    typer.echo(f"output: {dest}")


def read_input(source: str, fmt: str, settings: Settings) -> tuple[bytes, Path]:
    """The bytes of a file or an http(s) URL, and the default output path for them."""
    ext = contract.FORMATS[fmt]
    if is_url(source):
        from bgq.fetch import fetch_setting_image

        return fetch_setting_image(settings, source), Path(f"{url_stem(source)}.out{ext}")
    path = Path(source)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise typer.BadParameter(f"{source!r} {what}", param_hint="'FILE'")
    return path.read_bytes(), path.with_name(f"{path.stem}.out{ext}")


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
        typer.Option(help="JSONL report, one line per input [default: OUT/bgq-report.jsonl]."),
    ] = None,
    alpha_matting: AlphaMattingOpt = False,
    alpha_matting_foreground_threshold: ForegroundOpt = 240,
    alpha_matting_background_threshold: BackgroundOpt = 10,
    alpha_matting_erode_size: ErodeOpt = 10,
    only_mask: OnlyMaskOpt = False,
    post_process_mask: PostProcessOpt = False,
    bgcolor: BgcolorOpt = None,
    format: FormatOpt = "png",
    quality: QualityOpt = None,
    crop: CropOpt = False,
    crop_margin: CropMarginOpt = "0",
    canvas: CanvasOpt = None,
    padding: PaddingOpt = "0",
    position: PositionOpt = "center",
) -> None:
    """Remove the backgrounds of a whole catalog; exit 1 if any input failed (see the report)."""
    from producer.ingest import run_ingest

    options = rembg_options(locals())
    settings = load_settings()
    model = model_name(model, settings)
    failed = run_ingest(
        settings, src, out, model, options, window, report, fetch_concurrency=fetch_concurrency
    )
    if failed:
        raise typer.Exit(1)
