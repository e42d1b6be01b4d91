"""Where a job came from, and a job that reached a worker without its model, handed on.

In a rolling upgrade a job can reach a worker that does not serve its model: a producer from
before routing by model puts a u2net job in `bgq`, or an old worker's scheduler lets a u2net
bulk job into `bgq.bulk`. Run there, it would load a second model into the pool process (and
the memory model would then size every large input against both). It is handed on instead:
republished, with its id and headers (its guard token: its end is counted once), to its own
model's queue in its lane, then acknowledged without a state (Celery's `Ignore`).
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore
from kombu import Queue

from bgq import contract

log = logging.getLogger(__name__)


def lane_of(request: Any) -> str:
    """The lane a task came from: its queue (a retry keeps it), whatever its headers say."""
    route = contract.queue_route(queue_of(request))
    bulk = (route is not None and route[0] == contract.BULK) or queue_of(request).startswith(
        contract.run_queue("")
    )
    return contract.BULK if bulk else contract.INTERACTIVE


def queue_of(request: Any) -> str:
    """The queue a task was taken from (its routing key; bgq publishes to the default exchange)."""
    return str((request.delivery_info or {}).get("routing_key") or "")


def destination(request: Any, model: str, served: list[str]) -> str | None:
    """The queue to hand a job of `model` on to; None to run it here. A worker that serves the
    model runs it; so does one that took it from the model's own queue (added at run time with
    `add_consumer`): handing it on would hand it back to itself. A task taken from no queue
    (run eagerly, `Task.apply`) runs where it is called."""
    target = contract.image_queue(lane_of(request), model)
    if model in served or queue_of(request) in ("", target):
        return None
    return target


def hand_on(task: Task, target: str) -> NoReturn:
    """Republish this task's message to `target` (same id, arguments, headers and retries, so
    the guard token and FINISH's count stay the enqueue's), then end it without a state: Celery
    acknowledges an `Ignore`d task. A publish that fails raises (the caller retries it)."""
    request = task.request
    signature = task.signature_from_request(queue=Queue(target), declare=[])
    signature.apply_async()
    log.warning(
        "handed job %s on to %s: it is for model %s, which this worker does not serve",
        request.id,
        target,
        (request.kwargs or {}).get("model"),
    )
    raise Ignore()
