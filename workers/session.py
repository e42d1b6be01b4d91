"""onnxruntime sessions: created after fork, one per model per pool process, then reused."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bgq import defaults
from bgq.errors import ConfigError
from bgq.settings import Settings
from workers import models

if TYPE_CHECKING:
    import onnxruntime as ort
    from rembg.sessions.base import BaseSession

log = logging.getLogger(__name__)

_sessions: dict[str, BaseSession] = {}  # this process's sessions, by model name


def session_options(settings: Settings) -> ort.SessionOptions:
    """Thread count and memory arena as configured (BGQ_ORT_THREADS, BGQ_ORT_ARENA); the
    memory planner's options as measured best (docs/memory.md): same speed, ~290 MiB less."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.ort_threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = settings.ort_arena
    opts.enable_mem_pattern = defaults.ORT_MEM_PATTERN
    opts.enable_mem_reuse = defaults.ORT_MEM_REUSE
    return opts


def ensure_weights(settings: Settings) -> None:
    """Make the default model's weights available (fetching them if possible) or raise."""
    models.fetch(settings.model, settings.model_home)


def get(name: str, settings: Settings) -> BaseSession:
    """This process's session for model `name`, created on first use."""
    if name not in _sessions:
        from rembg import new_session

        models.fetch(name, settings.model_home)
        try:
            _sessions[name] = new_session(name, sess_opts=session_options(settings))
        except Exception as exc:
            raise ConfigError(f"cannot load model {name}: {exc}") from exc
    return _sessions[name]


def init_process(settings: Settings) -> None:
    """Load the default model in a fresh pool process; a failure is logged, tasks then report it."""
    _sessions.clear()  # never reuse a session inherited through fork
    models.use_models_dir(settings.model_home)
    try:
        get(settings.model, settings)
    except ConfigError as exc:
        log.error("pool process could not load model %s: %s", settings.model, exc)
