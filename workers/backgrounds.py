"""Background images (`bg_image`): an input in the store, checked as an input is, scaled to
cover the output frame and composited under it (docs/output.md)."""

from __future__ import annotations

from PIL import Image, ImageOps

from bgq.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from bgq.imageinfo import free_file, open_header
from bgq.options import JPEG_BACKGROUND, Options
from bgq.store import Store

IMAGE_ERRORS = (InvalidImage, ImageTooLarge, UnsupportedImage)  # open_header's, about the image
Region = tuple[float, float, float, float]  # left, top, right, bottom in the background's pixels


def open_background(store: Store, options: Options, max_megapixels: float) -> Image.Image | None:
    """The options' background image, its header checked (BGQ_MAX_MEGAPIXELS, mode) but its
    pixels not decoded yet; None without bg_image. A bad one is permanent, naming bg_image."""
    if options.bg_image is None:
        return None
    data = store.read_input(options.bg_image)
    try:
        return open_header(data, max_megapixels)
    except IMAGE_ERRORS as exc:
        raise type(exc)(f"bg_image: {exc}") from None


def decoded(background: Image.Image) -> Image.Image:
    """The background's pixels, turned as its EXIF says, opaque: any transparency over white;
    its file's bytes are freed as soon as they are decoded."""
    try:
        background.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        corrupt = f"bg_image: truncated or corrupt {background.format} image: {exc}"
        raise InvalidImage(corrupt) from None
    img = background
    ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
    free_file(img)  # after exif_transpose: a TIFF's EXIF is read from the file
    if img.mode in ("RGBA", "LA", "PA") or img.has_transparency_data:
        white = Image.new("RGBA", img.size, JPEG_BACKGROUND)
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def cover_region(size: tuple[int, int], frame: tuple[int, int]) -> Region:
    """The centred part of a background of `size` that, scaled with its aspect ratio kept,
    exactly covers `frame`: the whole width or the whole height, cropped on the other axis."""
    scale = max(frame[0] / size[0], frame[1] / size[1])
    width, height = frame[0] / scale, frame[1] / scale
    left, top = (size[0] - width) / 2, (size[1] - height) / 2
    return (left, top, left + width, top + height)


def cover(background: Image.Image, frame: tuple[int, int]) -> Image.Image:
    """A new RGB image of `frame`'s size: the background scaled to cover it, centred, cropped
    (Lanczos; the same pixels when it already has that size)."""
    if background.size == frame:
        return background.copy()
    region = cover_region(background.size, frame)
    return background.resize(frame, Image.Resampling.LANCZOS, box=region)


def composite(img: Image.Image, background: Image.Image) -> Image.Image:
    """The RGBA output over its background: opaque RGB, the background where alpha is 0 and
    the output's own colours where it is 255."""
    out = cover(decoded(background), img.size)
    out.paste(img, (0, 0), img)  # blends by the output's alpha
    return out
