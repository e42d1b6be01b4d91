"""What every `bgq` command shares: the Typer app, error handling, common checks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from bgq import contract
from bgq.errors import BgqError, ConfigError, InvalidRequest, ModelNotServed
from bgq.settings import Settings
from bgq.store import open_store

app = typer.Typer(
    help="bgq: distributed background removal (rembg on Celery/Redis).",
    no_args_is_help=True,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def shown_default(text: str) -> str:
    """`[default: TEXT]` for a help text: escaped, as Rich would take a bare `[...]` for markup
    and drop it (typer renders help with Rich)."""
    return rf"\[default: {text}]"


def handle_errors(func: F) -> F:
    """Turn bgq's errors into one line on stderr: exit 2 for setup problems (a model no live
    worker serves is one), 1 otherwise."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, ModelNotServed) as exc:
            typer.echo(f"bgq: {exc}", err=True)
            raise typer.Exit(2) from None
        except (BgqError, OSError) as exc:
            typer.echo(f"bgq: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def model_name(name: str | None, settings: Settings) -> str:
    """The model a command runs (--model, else BGQ_MODEL); an unknown one is a usage error."""
    try:
        return contract.check_model(name or settings.model)
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from None


def check_store(settings: Settings) -> None:
    """The store must be usable before a command starts serving (ConfigError naming the setting)."""
    if settings.result_redirect == "presigned" and settings.store_bucket is None:
        raise ConfigError(
            "BGQ_RESULT_REDIRECT=presigned needs an S3 store (BGQ_STORE_URL=s3://BUCKET[/PREFIX])"
        )
    open_store(settings).check()
