"""onnxruntime sessions: created after fork, one per model per pool process, then reused."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

from bgq import defaults
from bgq.errors import ConfigError
from bgq.settings import Settings
from workers import imaging, models

if TYPE_CHECKING:
    import onnxruntime as ort
    from rembg.sessions.base import BaseSession

log = logging.getLogger(__name__)

_sessions: dict[str, BaseSession] = {}  # this process's sessions, by model name
_served: list[str] = []  # the models this process's worker serves (BGQ_MODELS, its queues)

# What rembg imports when it loads but calls only for alpha matting or mask post-processing.
DEFERRED_MODULES = (
    "pymatting.alpha.estimate_alpha_cf",
    "pymatting.foreground.estimate_foreground_ml",
    "pymatting.util.util",
    "scipy.ndimage",
    "skimage.morphology",
)
DEFERRED_PARENTS = ("scipy", "skimage")  # their light parent packages, imported for real


def session_options(settings: Settings) -> ort.SessionOptions:
    """Threads and arena as configured; memory planner options as measured (docs/memory.md)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.ort_threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = settings.ort_arena
    opts.enable_mem_pattern = defaults.ORT_MEM_PATTERN
    opts.enable_mem_reuse = defaults.ORT_MEM_REUSE
    return opts


class _DeferredModule(types.ModuleType):
    """Stands in for a module until one of its functions is first called."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if (self.__name__, name) == ("skimage.morphology", "disk"):
            return _Disk(self.__name__, name)
        return _DeferredFunction(self.__name__, name)


class _DeferredFunction:
    """A function of a deferred module; the real module is imported on its first call."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        self.real: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.real is None:
            self.real = getattr(_import_real(self.module), self.name)
        return self.real(*args, **kwargs)


class _Disk(_DeferredFunction):
    """skimage's `disk(radius)`, which rembg calls once at import (`kernel = disk(1)`): the
    same array, computed as skimage does, so that importing rembg does not load skimage and
    scipy (~45 MiB); any other call goes to skimage itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != 1 or not isinstance(args[0], int):
            return super().__call__(*args, **kwargs)
        import numpy as np

        grid = np.arange(-args[0], args[0] + 1)
        x, y = np.meshgrid(grid, grid)
        return (x**2 + y**2 <= args[0] ** 2).astype(np.uint8)


def _import_real(module: str) -> types.ModuleType:
    """Drop the stand-ins of `module`'s top package, then import the real module."""
    top = module.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        if isinstance(sys.modules[name], _DeferredModule):
            del sys.modules[name]
    return importlib.import_module(module)


def defer_rembg_extras() -> None:
    """Load rembg without what only alpha matting and post-processing call (~185 MiB).

    numba (through pymatting), scipy.ndimage and skimage.morphology are then imported by the
    first task that calls one of their functions. Call before rembg is first imported.
    """
    if "rembg" in sys.modules:
        return
    for parent in DEFERRED_PARENTS:
        importlib.import_module(parent)  # light packages, loaded for real
    for module in DEFERRED_MODULES:
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                stand_in = _DeferredModule(name)
                stand_in.__path__ = []
                sys.modules[name] = stand_in


def preload() -> None:
    """Before fork: import what every pool process runs and freeze it, to share it (~30 MiB)."""
    import isal.isal_zlib  # noqa: F401
    import onnxruntime  # noqa: F401
    import rembg  # noqa: F401

    gc.collect()
    gc.freeze()  # the collector never writes to these objects, so their pages stay shared


def ensure_weights(settings: Settings, names: list[str]) -> None:
    """Make each served model's weights available (fetching them if possible) or raise."""
    for name in names:
        imaging.note_weights(name, models.fetch(name, settings.model_home))


def get(name: str, settings: Settings) -> BaseSession:
    """This process's session for model `name`, created on first use. A model this worker did
    not load at start (a job taken from a queue added at run time; others are handed on,
    workers/handoff.py) is loaded now: logged."""
    if name not in _sessions:
        from rembg import new_session

        if _served and name not in _served:
            log.warning("a job for model %s, which this worker did not load: loading it", name)

        imaging.note_weights(name, models.fetch(name, settings.model_home))
        try:
            _sessions[name] = new_session(name, sess_opts=session_options(settings))
        except Exception as exc:
            raise ConfigError(f"cannot load model {name}: {exc}") from exc
        trim_heap()
    return _sessions[name]


def served() -> list[str]:
    """The models this process's worker serves (empty: it consumes no image queue)."""
    return list(_served)


def loaded() -> frozenset[str]:
    """The models whose sessions this process holds (the memory model sizes them as a sum)."""
    return frozenset(_sessions)


def trim_heap() -> None:
    """Give glibc's free heap pages back to the system: loading a model leaves its parsed
    protobuf's buffers free but resident (u2net: about 200 MiB, docs/memory.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def init_process(settings: Settings, served: list[str]) -> None:
    """Load each served model once in a fresh pool process; a failure is logged, tasks then
    report it. With none served (a worker of webhooks or maintenance) nothing is loaded until
    a task needs it."""
    _sessions.clear()  # never reuse a session inherited through fork
    _served[:] = served
    models.use_models_dir(settings.model_home)
    for name in served:
        try:
            get(name, settings)
        except ConfigError as exc:
            log.error("pool process could not load model %s: %s", name, exc)
