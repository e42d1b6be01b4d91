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
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from PIL import Image
from redis.exceptions import LockError
from redis.lock import Lock

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

    The lookup and the model run happen under a Redis lock on the mask, so that while one pool
    process (on any machine) runs the model, the others that need the same mask wait, then find
    it stored. The lock's token is the job's key: a redelivery of a job whose process died while
    holding it takes it over at once instead of waiting for it to expire.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        load_session: Callable[[], BaseSession],
        client: redis.Redis | None,
        owner: str,
    ) -> None:
        self.store, self.name, self.client, self.owner = store, name, client, owner
        self.load_session = load_session
        self.masks: list[Image.Image] | None = None
        self.inferred = False  # True when the model ran here

    def predict(self, img: Image.Image, *args: Any, **kwargs: Any) -> list[Image.Image]:
        """rembg's call, on the image as rembg turned it (EXIF orientation applied)."""
        if self.masks is None:
            with self._locked():
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
    def _locked(self) -> Iterator[None]:
        """Hold the mask's lock (MASK_LOCK_TTL s at most). Without Redis, or after MASK_WAIT
        seconds of waiting, go ahead unlocked: the worst case is one more model run."""
        lock = self._acquire()
        try:
            yield
        finally:
            if lock is not None:
                with contextlib.suppress(redis.RedisError, LockError):
                    lock.release()

    def _acquire(self) -> Lock | None:
        if self.client is None:
            return None
        key = contract.mask_lock_key(self.name)
        lock = self.client.lock(key, timeout=defaults.MASK_LOCK_TTL, sleep=defaults.MASK_POLL)
        try:
            if self.client.get(key) == self.owner.encode():  # our own job's dead delivery
                self.client.delete(key)
            if lock.acquire(blocking_timeout=defaults.MASK_WAIT, token=self.owner):
                return lock
            log.warning(
                "masks %s still locked after %gs: running the model", self.name, defaults.MASK_WAIT
            )
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
