"""A worker's part in the lanes, from its main process: say which lanes it serves with how
many pool processes (the bulk queue is kept that deep), let waiting bulk jobs in, and now and
then sweep for bulk runs lost from the scheduler's ring (bgq.lanes.sweep).

Every WORKER_BEAT seconds, on the worker's own timer; an entry not renewed for
WORKER_ENTRY_TTL seconds stops counting, so a worker that dies uncleanly drops out by itself.
The lanes are read again at every beat: `add_consumer` and `cancel_consumer` change them.
Each beat also touches a file under BGQ_HOME/run first, Redis or not: `bgq probe alive` (a
liveness probe) reads it to tell a stuck main loop from a Redis outage.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from celery import bootsteps

from bgq import contract, defaults, lanes
from bgq.settings import load_settings

if TYPE_CHECKING:
    from celery.worker import WorkController

log = logging.getLogger(__name__)


def served_lanes(queues: list[str]) -> list[str]:
    """The lanes a worker consuming `queues` serves (for any model)."""
    routes = [contract.queue_route(queue) for queue in queues]
    return [lane for lane in contract.LANES if any(r and r[0] == lane for r in routes)]


def served_models(queues: list[str]) -> list[str]:
    """The models a worker consuming `queues` serves, in their order (none: no image queue)."""
    found: list[str] = []
    for route in map(contract.queue_route, queues):
        if route and route[1] not in found:
            found.append(route[1])
    return found


class LaneBeat(bootsteps.StartStopStep):
    """The worker's capacity entry and a scheduling pass, every WORKER_BEAT seconds."""

    requires: ClassVar = {"celery.worker.components:Timer"}

    def __init__(self, worker: WorkController, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.beat_file = lanes.beat_file(load_settings().run_dir, worker.hostname)

    def start(self, worker: WorkController) -> None:
        self.beat_file.parent.mkdir(parents=True, exist_ok=True)
        self.beat(worker, sweep_now=True)
        self.tref = worker.timer.call_repeatedly(defaults.WORKER_BEAT, self.beat, (worker,))

    def beat(self, worker: WorkController, sweep_now: bool = False) -> None:
        """Renew this worker's entry; let bulk jobs in; sweep (at start, whatever the
        interval); best effort: the next beat retries. A worker of webhooks or maintenance only
        serves no lane: its entry says so."""
        try:
            self.beat_file.touch()
        except OSError as exc:
            log.warning("cannot touch %s (`bgq probe alive` reads it): %s", self.beat_file, exc)
        queues = list(worker.app.amqp.queues.consume_from)
        served = served_lanes(queues)
        models = served_models(queues)
        client = worker.app.backend.client
        try:
            with client.pipeline(transaction=False) as pipe:
                lanes.register_worker(pipe, worker.hostname, served, worker.concurrency, models)
                if contract.BULK in served:
                    lanes.dispatch_on(pipe)
                pipe.execute()
            if contract.BULK in served and lanes.sweep(client, now=sweep_now):
                lanes.dispatch(client)
        except redis.RedisError as exc:
            log.warning("cannot renew this worker's lane entry: %s", exc)

    def stop(self, worker: WorkController) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
            try:
                lanes.unregister_worker(worker.app.backend.client, worker.hostname)
            except redis.RedisError as exc:
                log.warning("cannot remove this worker's lane entry (it expires): %s", exc)
            self.beat_file.unlink(missing_ok=True)

    def shutdown(self, worker: WorkController) -> None:
        self.stop(worker)
