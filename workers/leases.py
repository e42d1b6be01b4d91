"""Leases on the jobs a worker holds, kept by its main process (docs/architecture.md, Leases).

kombu already records every message a worker has taken but not acknowledged: its `unacked`
hash, and in the `unacked_index` sorted set the time it was taken. Every live worker's event
loop sweeps that index (bgq.connections.lease_options) and puts a message whose time is older
than the lease back at the head of its queue. A lease is that time, renewed: every lease/6 s
`LeaseBeat` sets it to Redis's clock for each message this worker still holds (reserved,
running, or waiting for its countdown), in one script.

A holder that could not renew for lease - lease/6 s (Redis unreachable, its loop stalled)
assumes its jobs were taken over, since the tag of a message is the same for every delivery:
it forgets them (`forfeit`), so neither its late acknowledgement or reject nor its hand-back
can touch the record of the job's new holder. kombu's restore of everything a channel held
when it closes is off in workers (`LeaseChannel`): a reconnect keeps the running jobs held.
`LeasedRequest` also counts the deaths of pool processes (the poison counter), which only the
main process sees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from billiard.exceptions import WorkerLostError
from celery import Task, bootsteps
from celery.worker import state
from celery.worker.request import Request
from kombu.transport import virtual

from bgq import contract, defaults

if TYPE_CHECKING:
    from celery.worker import WorkController
    from celery.worker.consumer import Consumer

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

# KEYS: a job's starts counter (workers/tasks.py): one start less, never below 0.
UNSTART = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


def lease_of(channel: Any) -> tuple[float, float] | None:
    """The channel's lease (kombu's visibility timeout) and renewal interval (its sweeps'
    interval, bgq.connections.lease_options); None on a transport without them."""
    lease = getattr(channel, "visibility_timeout", None)
    every = getattr(channel, "unacked_restore_interval", None)
    return None if lease is None or every is None else (lease, every)


def drop(qos: Any, tag: str) -> None:
    """kombu's acknowledgement (or reject) of `tag` in Redis."""
    qos._remove_from_indices(tag).execute()


def to_tail(qos: Any, tag: str) -> None:
    """kombu's requeue of `tag` (a reject with requeue): to the tail of its queue."""
    qos.restore_by_tag(tag, leftmost=True)


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
            if self.message.channel.closed:  # taken before a reconnect
                holder.settle(self, "ACK", drop)
            else:
                super().acknowledge()
            holder.let_go(self)
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged and holder.keeps(self, "requeue" if requeue else "reject"):
            if self.message.channel.closed:  # taken before a reconnect
                holder.settle(self, *(("REQUEUED", to_tail) if requeue else ("REJECTED", drop)))
                self.send_event("task-rejected", requeue=requeue)
            else:
                super().reject(requeue=requeue)
            if requeue:  # this start was no host lost (the requeue itself runs soon after)
                unstart(self)
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
    counts_starts = False  # ... and its starts (workers/tasks.py); a requeue takes one back


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


def unstart(request: Request) -> None:
    """A started job goes back to its queue (handed back, or requeued) with its worker alive:
    that start was no lost host, so it does not count towards MAX_STARTS. Best effort."""
    if not (getattr(request.task, "counts_starts", False) and request.time_start):
        return
    try:
        request.task.backend.client.eval(UNSTART, 1, contract.starts_key(request.id))
    except redis.RedisError as exc:
        log.warning("could not uncount a start of %s: %s", request.id, exc)


def tracked(request: Any) -> bool:
    """Whether Celery still holds `request` itself: running, reserved or waiting for its
    countdown. By identity: `state.requests` is keyed by task id, which a retry reuses, so a
    retry taken by this worker would make the run before it look dropped."""
    return any(
        request in held
        for held in (state.active_requests, state.reserved_requests, state.scheduled_requests)
    )


class Holder:
    """The main process's requests under lease, by delivery tag (one event loop: no locks)."""

    def __init__(self) -> None:
        self.requests: dict[str, LeasedRequest] = {}
        self.skewed = False
        self.channel: Any = None  # the consumer's current channel (LeaseChannel)

    def take(self, request: LeasedRequest) -> None:
        self.requests[request.message.delivery_tag] = request

    def let_go(self, request: LeasedRequest) -> None:
        """The request is acknowledged or rejected (Celery sends that to Redis from its event
        loop, just after): renew it no more. If Redis refuses, Celery logs it and the message's
        lease brings it back."""
        tag = request.message.delivery_tag
        if self.requests.get(tag) is request:
            del self.requests[tag]

    def through(self, message: Any) -> Any:
        """The channel to reach Redis through for `message`: its own, or, if a reconnect closed
        that one, the consumer's current one (same Redis, same keys)."""
        current = self.channel
        if message.channel.closed and current is not None and not current.closed:
            return current
        return message.channel

    def settle(self, request: LeasedRequest, outcome: str, op: Callable[[Any, str], Any]) -> None:
        """Settle a message whose channel a reconnect closed: `op(qos, tag)` in Redis through
        the current channel, then only locally on its own (kombu's mark of a settled tag)."""
        message = request.message
        try:
            op(self.through(message).qos, message.delivery_tag)
        except Exception as exc:  # any broker error: let_go leaves it to the lease
            log.warning("could not settle %s (%s)", request.id, exc)
            return
        virtual.QoS.ack(message.channel.qos, message.delivery_tag)
        message._state = outcome

    def hand_back(self, request: Request) -> bool:
        """Put a job this worker holds back at the head of its queue now (kombu's
        `restore_by_tag`: one transaction, out of `unacked`, RPUSH); False if Redis refused
        (its lease brings it back). Settled only locally after: kombu's ack would delete in
        Redis the record of the worker that took it meanwhile (the same tag). A job whose lease
        is no longer this worker's is left to its new holder."""
        message = request.message
        if message.acknowledged:
            return True
        if isinstance(request, LeasedRequest) and not self.keeps(request, "hand back"):
            request.acknowledged = True
            return True
        tag = message.delivery_tag
        unstart(request)  # before the restore: the next holder's start counts after it
        try:
            self.through(message).qos.restore_by_tag(tag)
        except Exception as exc:  # any broker error: its lease brings it back
            log.warning("could not hand back %s now (%s): redelivered later", request.id, exc)
            return False
        virtual.QoS.ack(message.channel.qos, tag)  # local only: Redis has it queued
        message._state = "REQUEUED"
        request.acknowledged = True  # nothing else acknowledges or rejects it
        if isinstance(request, LeasedRequest):
            self.let_go(request)
        return True

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
        dropped: list[LeasedRequest] = []
        for tag, request in list(self.requests.items()):
            if not holds(request.message):
                del self.requests[tag]  # being settled
            elif now - request.lease_renewed >= give_up:
                self.forfeit(request, f"not renewed for {now - request.lease_renewed:.0f}s")
            elif not tracked(request):
                dropped.append(request)
            else:
                held[tag] = request
        for request in dropped:  # left at a reconnect (Celery's on_close): an ETA or prefetched job
            if self.hand_back(request):
                log.info("handed back %s, dropped by Celery at a reconnect", request.id)
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


class LeaseChannel(bootsteps.StartStopStep):
    """At each (re)connection: the consumer's channel must not restore what it holds when it
    closes (kombu's `do_restore`). On a reconnect with Redis answering, that restore would
    requeue every running job while this worker still runs it. Leases make it needless: a
    closed channel's jobs still running are renewed and settled through the new channel, those
    Celery dropped (ETA, prefetched) are handed back by the next renewal, and a worker that
    stops hands back explicitly (workers/shutdown.py); what none of these reaches, its lease
    brings back."""

    requires: ClassVar = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, consumer: Consumer) -> None:
        channel = consumer.task_consumer.channel
        channel.do_restore = False
        holder.channel = channel


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
