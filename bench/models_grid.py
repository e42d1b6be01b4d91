"""docs/img/models-grid.png: the sample photos cut out by u2netp, u2net and u2net-int8.

u2net-int8 is the dropped experiment (bench/quantize.py; built under `$BGQ_HOME/bench/` when
missing), shown for comparison. `make models-grid`: one row per photo, the photo then each
model's cutout on a checkerboard, so that transparency shows. The sample photos (u2net-int8's
calibration photos), then the two held-out photos where int8 agrees least with u2net
(bench/model_quality.py).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw

from bench.model_quality import held_out_folder, session
from bgq.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ("anime-girl-1.jpg", "car-1.jpg", "cloth-1.jpg", "plants-1.jpg")
WORST_HELD_OUT = ("coins.png", "rocket.jpg")
MODELS = ("u2netp", "u2net", "u2net-int8")
CELL = 240  # px, the longer side of each picture
LABEL = 22  # px, the header row
SQUARE = 12  # px, the checkerboard's squares


def checkerboard(size: tuple[int, int]) -> Image.Image:
    board = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], SQUARE):
        for x in range((y // SQUARE) % 2 * SQUARE, size[0], 2 * SQUARE):
            draw.rectangle((x, y, x + SQUARE - 1, y + SQUARE - 1), fill=(204, 204, 204))
    return board


def thumbnail(image: Image.Image) -> Image.Image:
    image = image.copy()
    image.thumbnail((CELL, CELL), Image.Resampling.LANCZOS)
    return image


def on_board(cutout: Image.Image) -> Image.Image:
    board = checkerboard(cutout.size)
    board.paste(cutout, mask=cutout.getchannel("A"))
    return board


def grid() -> Image.Image:
    import rembg

    load_settings()
    sessions = {name: session(name) for name in MODELS}
    columns = ("photo", *MODELS)
    rows = len(photos())
    out = Image.new("RGB", (CELL * len(columns), LABEL + CELL * rows), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for col, title in enumerate(columns):
        draw.text((col * CELL + 8, 5), title, fill=(0, 0, 0))
    for row, path in enumerate(photos()):
        photo = Image.open(path).convert("RGBA")
        cells = [thumbnail(photo).convert("RGB")]
        for model in MODELS:
            cut = Image.open(io.BytesIO(rembg.remove(path.read_bytes(), session=sessions[model])))
            cells.append(on_board(thumbnail(cut.convert("RGBA"))))
        for col, cell in enumerate(cells):
            x = col * CELL + (CELL - cell.width) // 2
            y = LABEL + row * CELL + (CELL - cell.height) // 2
            out.paste(cell, (x, y))
    return out


def photos() -> list[Path]:
    held_out = held_out_folder()
    return [ROOT / "samples" / n for n in SAMPLES] + [held_out / n for n in WORST_HELD_OUT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "models-grid.png")
    args = parser.parse_args()
    grid().save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
