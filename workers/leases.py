"""Leases on the jobs a worker holds, kept by its main process (docs/architecture.md, Leases).

kombu already records every message a worker has taken but not acknowledged: its `unacked`
hash, and in the `unacked_index` sorted set the time it was taken. Every live worker's event
loop sweeps that index (bgq.connections.lease_options) and puts a message whose time is older
than the lease back at the head of its queue. A lease is that time, renewed: every lease/6 s
`LeaseBeat` sets it to Redis's clock for each message this worker still holds (reserved,
running, or waiting for its countdown), in one script.

A holder that could not renew for lease - lease/6 s (Redis unreachable, its loop stalled)
assumes its jobs were taken over, since the tag of a message is the same for every delivery:
it forgets them (`forfeit`), so neither its late acknowledgement or reject nor its
channel-close restore can touch the record of the job's new holder. `LeasedRequest` also
counts the deaths of pool processes (the poison counter), which only the main process sees.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from billiard.exceptions import WorkerLostError
from celery import Task, bootsteps
from celery.worker.request import Request

from bgq import contract, defaults

if TYPE_CHECKING:
    from celery.worker import WorkController

log = logging.getLogger(__name__)

# KEYS: kombu's unacked_index; ARGV: delivery tags. Each tag still in the index gets Redis's
# time as its score; returns that time and the tags no longer there (swept: taken over).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lost = {}
for _, tag in ipairs(ARGV) do
  if redis.call('ZSCORE', KEYS[1], tag) then
    redis.call('ZADD', KEYS[1], 'XX', now, tag)
  else
    table.insert(lost, tag)
  end
end
return {tostring(now), lost}
"""


def lease_of(channel: Any) -> tuple[float, float] | None:
    """The channel's lease (kombu's visibility timeout) and renewal interval (its sweeps'
    interval, bgq.connections.lease_options); None on a transport without them."""
    lease = getattr(channel, "visibility_timeout", None)
    every = getattr(channel, "unacked_restore_interval", None)
    return None if lease is None or every is None else (lease, every)


def holds(message: Any) -> bool:
    """Whether the message's channel still counts it as taken and not yet settled."""
    qos = getattr(message.channel, "qos", None)
    tag = message.delivery_tag
    return qos is not None and qos._delivered.get(tag) is message and tag not in qos._dirty


class LeasedRequest(Request):
    """A task message under a lease: acknowledged or rejected only while the lease is this
    worker's; a pool process that died with it is counted against the job (poison counter)."""

    acknowledged: bool

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.lease_renewed = time.monotonic()  # kombu wrote the lease just before
        self.lease_lost = False
        holder.take(self)

    def acknowledge(self) -> None:
        if not self.acknowledged and holder.keeps(self, "acknowledge"):
            super().acknowledge()
            holder.let_go(self)
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged and holder.keeps(self, "requeue" if requeue else "reject"):
            super().reject(requeue=requeue)
            holder.let_go(self)
        self.acknowledged = True

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        if getattr(self.task, "counts_deaths", False) and self._worker_lost(exc_info.exception):
            count_death(self.task.backend.client, self.id)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _worker_lost(self, exc: Any) -> bool:
        """Whether the pool process running this task died (as Request.on_failure tells it)."""
        exc = getattr(exc, "exc", exc)  # an ExceptionWithTraceback
        if isinstance(exc, WorkerLostError):
            return True
        cancelled = self._already_cancelled or self._already_revoked
        return isinstance(exc, SystemExit | KeyboardInterrupt) and not cancelled


class LeasedTask(Task):
    """The base of bgq's tasks: their messages are held under leases."""

    Request = "workers.leases:LeasedRequest"
    counts_deaths = False  # the image task counts its pool processes' deaths (poison jobs)


def count_death(client: redis.Redis, key: str) -> None:
    """One more pool process died running job `key`; the task refuses it after MAX_DELIVERIES.
    Best effort: a death not counted is still bounded by the starts counter (MAX_STARTS)."""
    try:
        with client.pipeline() as pipe:
            pipe.incr(contract.attempts_key(key))
            pipe.expire(contract.attempts_key(key), defaults.RESULT_TTL)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not count the death of a pool process running %s: %s", key, exc)


class Holder:
    """The main process's requests under lease, by delivery tag (one event loop: no locks)."""

    def __init__(self) -> None:
        self.requests: dict[str, LeasedRequest] = {}
        self.skewed = False

    def take(self, request: LeasedRequest) -> None:
        self.requests[request.message.delivery_tag] = request

    def let_go(self, request: LeasedRequest) -> None:
        """The request is acknowledged or rejected. If Redis refused that, kombu still counts
        the message as held: forget it, so it is not renewed and the lease brings it back."""
        tag = request.message.delivery_tag
        if self.requests.get(tag) is request:
            del self.requests[tag]
        if holds(request.message):
            del request.message.channel.qos._delivered[tag]
            log.warning("could not settle %s in Redis: its lease will requeue it", request.id)

    def keeps(self, request: LeasedRequest, doing: str) -> bool:
        """Whether `request`'s lease is still this worker's; if it is not, forfeit it."""
        lease = lease_of(request.message.channel)
        fresh = lease is None or time.monotonic() - request.lease_renewed < forfeit_after(*lease)
        if request.lease_lost or not (holds(request.message) and fresh):
            self.forfeit(request, f"not doing its {doing}")
            return False
        return True

    def forfeit(self, request: LeasedRequest, why: str) -> None:
        """Forget a request whose lease may be another worker's now: never renew, settle or
        restore it again (the task itself may still finish: its result is idempotent)."""
        message = request.message
        if holds(message):
            del message.channel.qos._delivered[message.delivery_tag]
        if self.requests.get(message.delivery_tag) is request:
            del self.requests[message.delivery_tag]
        if not request.lease_lost:
            log.warning("lost the lease on %s (another worker runs it): %s", request.id, why)
        request.lease_lost = True

    def renew(self, channel: Any) -> None:
        """Renew the leases of the requests still held, through `channel` (the consumer's
        current one; a request taken on a channel since replaced, after a reconnect, is renewed
        while that channel still holds it); forfeit the stale ones."""
        lease = lease_of(channel)
        if lease is None:
            return
        give_up = forfeit_after(*lease)
        now = time.monotonic()
        held: dict[str, LeasedRequest] = {}
        for tag, request in list(self.requests.items()):
            if not holds(request.message):
                del self.requests[tag]  # restored when its channel closed, or being settled
            elif now - request.lease_renewed >= give_up:
                self.forfeit(request, f"not renewed for {now - request.lease_renewed:.0f}s")
            else:
                held[tag] = request
        if not held:
            return
        with channel.conn_or_acquire() as client:
            reply = client.register_script(RENEW)(keys=[channel.unacked_index_key], args=list(held))
        self.check_clock(float(reply[0]), lease[1])
        lost = {t.decode() if isinstance(t, bytes) else t for t in reply[1]}
        for tag, request in held.items():
            if tag in lost:
                self.forfeit(request, "its lease expired and was swept")
            else:
                request.lease_renewed = now

    def check_clock(self, redis_now: float, every: float) -> None:
        """Warn while this host's clock is off Redis's by over a renewal interval: as a sweeper
        it would take other workers' jobs early (ahead) or late (behind). Leases need NTP."""
        offset = time.time() - redis_now
        skewed = abs(offset) > every
        if skewed and not self.skewed:
            log.warning("this host's clock is %.1fs off Redis's: leases need NTP", offset)
        self.skewed = skewed


def forfeit_after(lease: float, every: float) -> float:
    """Seconds without a renewal after which a holder gives its lease up: before anyone else
    may take it (lease), with one renewal interval to spare for the clocks."""
    return lease - every


holder = Holder()


class LeaseBeat(bootsteps.StartStopStep):
    """Renews this worker's leases every lease/6 seconds, on the worker's own event loop."""

    requires: ClassVar = {"celery.worker.components:Timer"}

    def __init__(self, worker: WorkController, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: WorkController) -> None:
        options = worker.app.conf.broker_transport_options or {}
        every = options.get("unacked_restore_interval", defaults.LEASE // 6)
        self.tref = worker.timer.call_repeatedly(every, self.beat, (worker,))

    def beat(self, worker: WorkController) -> None:
        """One renewal; best effort: a failed one is retried at the next beat."""
        consumer = getattr(worker, "consumer", None)
        channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
        if channel is None:
            return  # not consuming yet, or reconnecting
        try:
            holder.renew(channel)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not renew this worker's leases: %s", exc)

    def stop(self, worker: WorkController) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, worker: WorkController) -> None:
        self.stop(worker)
