"""`bgq models fetch` and the weights check of `bgq up` / `bgq worker`: the CLI's worker side.

The only module of the CLI that reaches into `workers/`, and only inside its functions: every
role runs `bgq`, and a producer's commands must not load the workers' package.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bgq.settings import Settings, load_settings
from producer.cli.common import handle_errors, model_name, shown_default

models_app = typer.Typer(help="Model weights.", no_args_is_help=True)


def ensure_model(settings: Settings, names: list[str] | None = None) -> None:
    """The weights of every model the workers will serve (`names`, else BGQ_MODELS, else
    BGQ_MODEL) under BGQ_MODELS_DIR, fetched if missing (before workers start)."""
    from workers import models  # the workers' code, loaded only when this runs

    for name in settings.served_models if names is None else names:
        models.fetch(name, settings.model_home)


@models_app.command("fetch")
@handle_errors
def models_fetch(
    name: Annotated[
        str | None, typer.Argument(help=f"Model name {shown_default('BGQ_MODEL')}.")
    ] = None,
) -> None:
    """Put a model's weights where rembg looks for them, BGQ_MODELS_DIR/models/NAME/NAME.onnx,
    and check them."""
    from workers import models, session  # the workers' code, loaded only when this runs

    session.defer_rembg_extras()  # rembg's model table, without compiling pymatting's numba code
    settings = load_settings()
    path = models.fetch(model_name(name, settings), settings.model_home)
    typer.echo(f"{name or settings.model}: {path}")
