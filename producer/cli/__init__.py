"""The `bgq` command-line tool: its entry point; the commands live in this package's modules."""

from __future__ import annotations

from producer.cli import cache, images, services  # noqa: F401  (they register commands)
from producer.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `bgq` console script."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process is bgq's: BGQ_MAX_MEGAPIXELS is the limit
    app()


if __name__ == "__main__":
    main()
