"""The Celery app (`celery -A workers.app worker`) and its process signals."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_init, worker_process_init

import celeryconfig
from bgq.errors import BgqError
from bgq.settings import load_settings
from workers import session

log = logging.getLogger(__name__)

session.defer_rembg_extras()  # before anything imports rembg
settings = load_settings()
app = Celery("bgq", include=["workers.tasks", "workers.webhooks", "workers.maintenance"])
app.conf.update(celeryconfig.build(settings))


@worker_init.connect
def _check_model(**_: object) -> None:
    """Before forking: the model's weights must be in place; then preload what pools share."""
    try:
        session.ensure_weights(settings)
    except BgqError as exc:
        log.critical("bgq worker cannot start: %s", exc)
        raise SystemExit(f"bgq worker cannot start: {exc}") from None
    session.preload()


@worker_process_init.connect
def _load_session(**_: object) -> None:
    """After fork, in each pool process: create its own onnxruntime session."""
    session.init_process(settings)
