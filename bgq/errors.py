"""bgq's exceptions: one base class, a permanent and a transient branch."""

from __future__ import annotations

from collections.abc import Iterable


class BgqError(Exception):
    """Base class of every error bgq raises on purpose."""


class PermanentError(BgqError):
    """Retrying cannot help: the input, the request or the configuration is wrong."""


class InvalidImage(PermanentError):
    """The bytes are empty, not an image, or a truncated/corrupt one."""


class ImageTooLarge(PermanentError):
    """The image has more pixels than BGQ_MAX_MEGAPIXELS allows (known from its header)."""


class UnsupportedImage(PermanentError):
    """The image decodes, but rembg cannot process its mode with the requested options."""


class InvalidRequest(PermanentError):
    """Unknown model, bad option value or malformed task arguments."""


class OutOfMemory(PermanentError):
    """Processing the image ran out of memory; retrying on the same fleet would repeat that."""


class WorkerCrashed(PermanentError):
    """The job killed its worker process too many times (crash or out of memory)."""


class ConfigError(PermanentError):
    """A setting is invalid or the environment is not set up (no broker, no model weights)."""


class NoBroker(ConfigError):
    """BGQ_REDIS_URL is unset and no embedded Redis (`bgq up`) runs for this BGQ_HOME."""


class TransientError(BgqError):
    """May succeed when retried: Redis or store I/O trouble."""


class BrokerError(TransientError):
    """Redis, as broker or result store, is unreachable or failing."""


class StoreError(TransientError):
    """Reading or writing the shared store failed (I/O error, input blob not visible yet)."""


class NotInStore(StoreError):
    """The object is not in the store (yet: a shared filesystem may show it late)."""


class ModelNotServed(TransientError):
    """No live worker serves the job's model: refused rather than queued for nobody (a worker
    that serves it may start)."""

    def __init__(
        self, model: str, served: Iterable[str], lane: str | None = None, elsewhere: str = ""
    ) -> None:
        """`served`: the models live workers serve; `elsewhere`: the lane(s) where workers
        serve `model` when they do, but not in the job's `lane`."""
        names = sorted(served)
        workers = f"workers serve {', '.join(names)}" if names else "no worker is live"
        if lane is not None and elsewhere:
            super().__init__(
                f"model {model}: no live worker serves it in the {lane} lane (its workers "
                f"serve the {elsewhere} lane only); start one with "
                f"`bgq worker --models {model} --lanes {lane}`"
            )
        else:
            super().__init__(
                f"model {model}: no live worker serves it ({workers}); start one with "
                f"BGQ_MODELS={model} or `bgq worker --models {model}`"
            )
        self.model = model
        self.served = names
        self.lane = lane


class JobFailed(BgqError):
    """A job ended in failure; `error` is the worker's one-line reason."""

    def __init__(self, key: str, error: str, permanent: bool = True) -> None:
        super().__init__(f"job {key} failed: {error}")
        self.key = key
        self.error = error
        self.permanent = permanent


class JobTimeout(BgqError):
    """A job did not finish within the time the caller was willing to wait."""
