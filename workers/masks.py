"""Masks: one model run per (input, model), kept in the store, every output variant derived.

rembg.remove() calls `session.predict(img)` once and derives everything else (post-processing,
alpha matting, the cutout, bgcolor) from the masks it returns. `MaskSource` stands in for the
session: it answers with the stored masks when there are some, else runs the model once and
keeps what it answered. rembg's own code does the rest, so a derived output is exactly the
output a model run would have given.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from PIL import Image

from bgq import contract, defaults
from bgq.contract import MASKS
from bgq.errors import StoreError
from workers.imaging import fast_png

if TYPE_CHECKING:
    from rembg.sessions.base import BaseSession

    from bgq.store import Store

log = logging.getLogger(__name__)


class MaskSource:
    """A rembg session stand-in: the stored masks of (input, model), else the model's, once.

    While one pool process (on any machine) runs the model for a mask, the others that need
    the same mask wait for it in the store instead of running the model too.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        load_session: Callable[[], BaseSession],
        client: redis.Redis | None,
    ) -> None:
        self.store, self.name, self.client = store, name, client
        self.load_session = load_session
        self.masks: list[Image.Image] | None = None
        self.inferred = False  # True when the model ran here

    def predict(self, img: Image.Image, *args: Any, **kwargs: Any) -> list[Image.Image]:
        """rembg's call, on the image as rembg turned it (EXIF orientation applied)."""
        if self.masks is None:
            self.masks = self._stored(img.size)
        if self.masks is None:
            with self._claim() as first:
                if not first:
                    self.masks = self._stored(img.size)
                if self.masks is None:
                    self.masks = list(self.load_session().predict(img, *args, **kwargs))
                    self.inferred = True
                    self._keep(self.masks)
        return list(self.masks)

    def _stored(self, size: tuple[int, int]) -> list[Image.Image] | None:
        """The stored masks (their use recorded for prune), or None."""
        try:
            if not self.store.use(MASKS, self.name):
                return None
            return unstack(self.store.read(MASKS, self.name), size)
        except StoreError as exc:  # vanished or unreadable: the model can make them again
            log.warning("cannot read masks %s, running the model: %s", self.name, exc)
            return None

    def _keep(self, masks: list[Image.Image]) -> None:
        """Store new masks; failing to only costs a later variant one more model run."""
        data = stack(masks)
        if data is None:
            return
        try:
            self.store.write(MASKS, self.name, data)
        except StoreError as exc:
            log.warning("cannot store masks %s: %s", self.name, exc)

    @contextlib.contextmanager
    def _claim(self) -> Iterator[bool]:
        """Hold the mask's lock while computing; yield False if another process made the mask
        meanwhile. Without Redis, or after MASK_WAIT seconds, go ahead (nothing is lost)."""
        key, token = contract.mask_lock_key(self.name), f"{os.getpid()}-{time.time()}"
        held = self._lock(key, token)
        try:
            yield held is not False
        finally:
            with contextlib.suppress(redis.RedisError):
                if held and self.client is not None and self.client.get(key) == token.encode():
                    self.client.delete(key)

    def _lock(self, key: str, token: str) -> bool | None:
        """True once the lock is ours, False when the masks appear, None to go ahead unlocked."""
        deadline = time.monotonic() + defaults.MASK_WAIT
        try:
            while self.client is not None and time.monotonic() < deadline:
                if self.client.set(key, token, nx=True, ex=defaults.TASK_TIME_LIMIT):
                    return True
                time.sleep(defaults.MASK_POLL)
                if self.store.stat(MASKS, self.name) is not None:
                    return False
        except redis.RedisError as exc:
            log.warning("cannot lock masks %s, running the model: %s", self.name, exc)
        return None


def stack(masks: list[Image.Image]) -> bytes | None:
    """The masks, one under the other, as one 8-bit greyscale PNG (lossless); None if a mask
    is not 8-bit greyscale (every rembg model's is), as it would not come back the same."""
    if not masks or any(mask.mode != "L" for mask in masks):
        return None
    if len(masks) == 1:
        return fast_png(masks[0])
    width, height = masks[0].size
    sheet = Image.new("L", (width, height * len(masks)))
    for index, mask in enumerate(masks):
        sheet.paste(mask, (0, index * height))
    return fast_png(sheet)


def unstack(data: bytes, size: tuple[int, int]) -> list[Image.Image] | None:
    """The masks of an image of `size` from `stack`'s PNG; None if they do not fit it."""
    try:
        sheet = Image.open(io.BytesIO(data))
        sheet.load()
    except (OSError, SyntaxError, ValueError):
        return None
    width, height = size
    if sheet.mode != "L" or sheet.width != width or sheet.height % height or not sheet.height:
        return None
    if sheet.height == height:
        return [sheet]
    return [sheet.crop((0, top, width, top + height)) for top in range(0, sheet.height, height)]
