"""The `bgq` command-line tool: its entry point; the commands live in producer/cli_*.py."""

from __future__ import annotations

from producer import cli_cache, cli_images, cli_services  # noqa: F401  (they register commands)
from producer.cli_common import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `bgq` console script."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process is bgq's: BGQ_MAX_MEGAPIXELS is the limit
    app()


if __name__ == "__main__":
    main()
