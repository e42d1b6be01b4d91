"""The `bgq.prune_cache` task that `bgq beat` sends every PRUNE_INTERVAL seconds."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from bgq import cache, contract
from workers.app import app, app_store, settings

log = logging.getLogger(__name__)


@app.task(name=contract.PRUNE_TASK_NAME, queue=contract.MAINTENANCE_QUEUE)
def prune_cache() -> dict[str, Any]:
    """Prune the store with this worker's BGQ_CACHE_MAX_AGE / _MAX_SIZE / _KEEP_INPUTS."""
    client = app.backend.client
    with cache.prune_lock(client) as held:
        if not held:
            return {"skipped": "another prune is running"}
        report = cache.prune(
            app_store(),
            client,
            max_age=settings.cache_max_age,
            max_size=settings.cache_max_size,
            keep_inputs=settings.cache_keep_inputs,
        )
    log.info("prune: %s", report)
    return dataclasses.asdict(report)
