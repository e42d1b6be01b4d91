"""The `bgq` command-line tool: the app, its entry point, and its command groups wired in."""

from __future__ import annotations

from PIL import Image

from producer.cli import images, probe, services  # noqa: F401  (they register commands)
from producer.cli.cache import cache_app
from producer.cli.common import app
from producer.cli.models import models_app

app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `bgq` console script."""
    Image.MAX_IMAGE_PIXELS = None  # this process is bgq's: BGQ_MAX_MEGAPIXELS is the limit
    app()
