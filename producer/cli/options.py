"""The output flags of `bgq submit` and `bgq ingest`, declared once: derived from `Options`.

Each field of `bgq.options.Options` is one flag (but PYTHON_ONLY's: bg_image names a stored
input): its name, type and default come from the field; its short flag and help text from FLAGS
below (the HTTP API's OpenAPI schema describes the same fields in its own words). A command
takes them as one `options: Options` parameter. Options' errors name the flags (FLAG_TERMS):
`--crop-margin applies only with --crop`.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from bgq import defaults
from bgq.errors import ConfigError, InvalidRequest
from bgq.options import PYTHON_ONLY, Options, Terms
from producer.cli.common import shown_default

# Per Options field: its short flag ("" for none) and its help (None for none).
FLAGS: dict[str, tuple[str, str | None]] = {
    "alpha_matting": ("-a", None),
    "alpha_matting_foreground_threshold": ("-af", None),
    "alpha_matting_background_threshold": ("-ab", None),
    "alpha_matting_erode_size": ("-ae", None),
    "only_mask": ("-om", None),
    "post_process_mask": ("-ppm", None),
    "bgcolor": ("-bgc", "Background colour R,G,B,A."),
    "format": ("", "png, webp, jpeg or zip (color.jpg and alpha.png)."),
    "quality": ("", f"1-100 (webp, jpeg, zip) {shown_default(str(defaults.QUALITY))}."),
    "crop": ("", "Crop to the subject."),
    "crop_margin": ("", "Margin around the cropped subject: 20px, 5%, 'TB LR' or 'T R B L'."),
    "canvas": ("", "Place the subject on a WxH canvas (1000x1000)."),
    "padding": ("", "Space between subject and canvas edge: 20px or 5%."),
    "position": (
        "",
        "Where the subject sits, with a canvas or scale: center, top, bottom, X% or 'X% Y%'.",
    ),
    "roi": ("", "Region of interest 'x1 y1 x2 y2' (px or %); outside it is background."),
    "scale": ("", "Subject scaled to 10%-100% of the frame, or original (its own size)."),
    "fit_megapixels": ("", "Scale the output down to at most this many megapixels."),
}

R = TypeVar("R")


def flag_type(field: FieldInfo) -> Any:
    """What a flag parses: a bool or an int as itself, anything else as text for Options."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    kind = annotation if annotation in (bool, int) else str
    return kind | None if field.default is None else kind


def flag_name(name: str) -> str:
    """The long flag of an Options field: `--name-with-dashes`."""
    return f"--{name.replace('_', '-')}"


# Options' errors in the CLI's terms: `--crop-margin applies only with --crop`.
FLAG_TERMS = Terms(name=flag_name, given=flag_name, between=" ")


def flag(name: str, field: FieldInfo) -> inspect.Parameter:
    """The command parameter of one Options field: its long flag, short flag, help."""
    short, help_text = FLAGS[name]
    decls = [flag_name(name), *([short] if short else [])]
    option = typer.Option(*decls, help=help_text)
    annotation = Annotated[flag_type(field), option]  # type: ignore[valid-type]  # built at run time
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=field.default, annotation=annotation)


PARAMETERS = [
    flag(name, field) for name, field in Options.model_fields.items() if name not in PYTHON_ONLY
]


def parse_options(values: dict[str, Any]) -> Options:
    """The output flags' values, validated (a bad one is a usage error)."""
    try:
        return Options.parse(values, FLAG_TERMS)
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from None


def output_options(command: Callable[..., R]) -> Callable[..., R]:
    """Give `command` the output flags in place of its `options: Options` parameter."""
    signature = inspect.signature(command, eval_str=True)
    params = list(signature.parameters.values())
    at = [param.name for param in params].index("options")
    params[at : at + 1] = PARAMETERS

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        values = {param.name: kwargs.pop(param.name) for param in PARAMETERS}
        return command(*args, options=parse_options(values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
