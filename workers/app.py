"""The Celery app (`celery -A workers.app worker`) and its process signals."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from celery import Celery
from celery.signals import worker_init, worker_process_init

import celeryconfig
from bgq.errors import BgqError
from bgq.settings import load_settings
from bgq.store import Store, open_store
from workers import lanes_step, leases, session, shutdown

if TYPE_CHECKING:
    from celery.worker import WorkController

log = logging.getLogger(__name__)

session.defer_rembg_extras()  # before anything imports rembg
settings = load_settings()
app = Celery(
    "bgq",
    include=["workers.tasks", "workers.webhooks", "workers.maintenance"],
    task_cls=leases.LeasedTask,  # every task's message is held under a lease
)
app.conf.update(celeryconfig.build(settings))
app.steps["worker"].add(lanes_step.LaneBeat)
app.steps["worker"].add(leases.LeaseBeat)
app.steps["consumer"].add(leases.LeaseChannel)
app.steps["consumer"].add(shutdown.GracefulShutdown)


_store: Store | None = None
served: list[str] = settings.served_models  # decided before the pool forks (see _check_worker)


def app_store() -> Store:
    """This process's store (its clients are made after fork, on first use)."""
    global _store
    if _store is None:
        _store = open_store(settings)
    return _store


@worker_init.connect
def _check_worker(sender: WorkController, **_: object) -> None:
    """In the main process, before forking: the store must be usable, and a worker needs the
    weights of every model whose image queues it consumes; one that serves only webhooks or
    maintenance loads none."""
    global served
    queues = list(sender.app.amqp.queues.consume_from)
    served = lanes_step.served_models(queues)
    try:
        open_store(settings).check()
        session.ensure_weights(settings, served)
    except BgqError as exc:
        log.critical("bgq worker cannot start: %s", exc)
        raise SystemExit(f"bgq worker cannot start: {exc}") from None
    if not served:
        log.info("this worker consumes %s, no image queue: no model is loaded", ",".join(queues))
    else:
        log.info("this worker serves %s", ", ".join(served))
        session.preload()  # what every pool process imports, shared copy-on-write


@worker_process_init.connect
def _load_session(**_: object) -> None:
    """After fork, in each pool process: create its own session of each model it serves."""
    session.init_process(settings, served)
    if not served:
        log.info("pool process %d: no model loaded", os.getpid())
