"""Graceful scale-down: SIGTERM (or SIGINT) makes a worker take no new job at once, lets the
running ones finish for up to BGQ_SHUTDOWN_GRACE seconds, then hands every unfinished one back
to the head of its queue and exits 0; it exits as soon as nothing runs.

A consumer bootstep of the main process, replacing Celery's own SIGTERM handling (a warm
shutdown waits for every task, with no bound but the time limit; its soft shutdown sleeps the
whole timeout in the signal handler: docs/architecture.md "Scaling down"). The signal
handler only notes the time; the worker's event loop does the work, every DRAIN_TICK seconds:

1. at the first signal: cancel the task consumer (no new message is taken) and hand back the
   messages held for a countdown (ETA) or waiting for a free pool process (prefetched), which
   would otherwise start during the grace;
2. while a job runs and the grace lasts: nothing (a job that ends is acknowledged as usual);
3. at the end of the grace, or at a second signal: kill the pool processes of the jobs still
   running (Celery's `Request.cancel`: the main process sees `Terminated`, never
   `WorkerLostError`) and hand their messages back; then stop the worker, exit code 0.

Handing back is kombu's own restore of one delivery (`QoS.restore_by_tag`, through
`leases.Holder.hand_back`): one Redis transaction moves the message from the `unacked` hash to
the head of its queue, where the next BRPOP of any worker takes it; the message is then settled
only in this process. A job whose lease this worker lost is left alone (its new holder runs
it). If Redis cannot be reached the message stays in `unacked`, where its lease finds it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

import psutil
from celery import bootsteps, platforms, signals
from celery.worker import state

from bgq import defaults
from bgq.settings import load_settings
from workers import leases

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request

log = logging.getLogger(__name__)

HANDLED = ("SIGTERM", "SIGINT")


def hand_back(request: Request) -> bool:
    """Put a job's message back at the head of its queue, now; False if Redis refused."""
    if not leases.holder.hand_back(request):
        return False
    state.task_ready(request)
    return True


def withdraw(consumer: Consumer, request: Request) -> bool:
    """Take back a job that waits for a free pool process (prefetched past the pool's size):
    in the worker's semaphore, or in the pool's buffer; False once a process may have it.
    What Celery's own `Consumer.on_close` does to all of them (`semaphore.clear()`, `flush()`)."""
    waiting: Any = getattr(getattr(consumer.controller, "semaphore", None), "_waiting", ())
    for waiter in tuple(waiting):
        if any(arg is request for arg in waiter[1]):  # (callback, args, kwargs)
            waiting.remove(waiter)
            return True
    job = request._apply_result() if request._apply_result is not None else None
    buffer = getattr(getattr(consumer.pool, "_pool", None), "outbound_buffer", None)
    if job is None or buffer is None or job._accepted or job._scheduled_for is not None:
        return False
    try:
        buffer.remove(job)
    except ValueError:  # already taken from the buffer
        return False
    job.discard()
    return True


def unfinished() -> list[Request]:
    """The jobs this worker holds that have not ended: running or waiting for a pool process."""
    held = set(state.active_requests) | set(state.reserved_requests)
    return [r for r in held if not r.acknowledged and r.id not in state.successful_requests]


class GracefulShutdown(bootsteps.StartStopStep):
    """SIGTERM/SIGINT: stop consuming, wait for running jobs up to the grace, hand back the rest."""

    requires: ClassVar = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, consumer: Consumer, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.grace = load_settings().shutdown_grace
        self.signalled: float | None = None  # monotonic time of the first signal
        self.deadline: float | None = None
        self.draining = False
        self.done = False
        self.tref: Any = None
        self.ticked = 0.0  # monotonic time of the event loop's last tick
        self.watchdog: threading.Timer | None = None

    def start(self, consumer: Consumer) -> None:
        for name in HANDLED:  # after Celery's own handlers, which Worker.on_start installed
            platforms.signals[name] = self.on_signal
        if self.draining:  # the consumer restarted (a lost connection) during the grace:
            # cancel intake once its event loop has subscribed the queues again (it does, after
            # every step has started), before the loop's first BRPOP
            if consumer.hub is not None:
                consumer.hub.call_soon(self.stop_intake, consumer)
            else:  # no event loop (not the prefork pool): nothing re-subscribes after us
                self.stop_intake(consumer)
        if self.tref is None:
            self.tref = consumer.timer.call_repeatedly(
                defaults.DRAIN_TICK, self.tick, (consumer,), priority=0
            )

    def on_signal(self, signum: int, _frame: object) -> None:
        """Note the time (the event loop does the work); a second signal ends the grace now.
        With no event loop running (the consumer reconnecting to the broker), stop as Celery
        would: its connection retries check the flag, and Redis keeps what it holds. Either
        way a watchdog ends the grace should the event loop not tick then: it may be stuck in
        a call that retries the broker forever (Celery's heartbeat publishes with no bound)."""
        now = time.monotonic()
        if self.signalled is None:
            self.signalled, self.deadline = now, now + self.grace
        else:
            self.deadline = now
        if self.tref is None:
            state.should_stop = platforms.EX_OK  # Celery's warm stop would wait unbounded
        self.arm_expiry()

    def tick(self, consumer: Consumer) -> None:
        self.ticked = time.monotonic()
        if self.deadline is None or self.done:
            return
        if not self.draining:
            self.draining = True
            self.begin(consumer)
        running = unfinished()
        if running and time.monotonic() < self.deadline:
            return
        if running:
            self.give_up(consumer, running)
        assert self.signalled is not None
        log.warning(
            "graceful shutdown: stopping %.1f s after the signal (%d running job(s) handed back)",
            time.monotonic() - self.signalled, len(running),
        )  # fmt: skip
        self.done = True
        state.should_stop = platforms.EX_OK  # the event loop raises WorkerShutdown(0)

    def begin(self, consumer: Consumer) -> None:
        """Take no new message; hand back those held for a countdown or a free pool process."""
        signals.worker_shutting_down.send(
            sender=consumer.hostname, sig="SIGTERM", how="Graceful", exitcode=platforms.EX_OK
        )
        self.stop_intake(consumer)
        waiting = 0
        for request in tuple(state.scheduled_requests):
            entry = request._eta_timer_entry
            if entry is not None:
                consumer.timer.cancel(entry)
            if hand_back(request):
                state.scheduled_requests.discard(request)
                waiting += 1
        for request in tuple(state.reserved_requests - state.active_requests):
            if withdraw(consumer, request) and hand_back(request):
                waiting += 1
        log.warning(
            "graceful shutdown: taking no new jobs; %d waiting job(s) handed back, %d running "
            "may finish within %g s (a second SIGTERM or Ctrl-C hands them back now)",
            waiting, len(unfinished()), self.grace,
        )  # fmt: skip

    def stop_intake(self, consumer: Consumer) -> None:
        if consumer.task_consumer is not None:
            try:
                consumer.task_consumer.cancel()
            except Exception as exc:  # the connection's close stops it as well
                log.warning("could not cancel the task consumer: %s", exc)

    def give_up(self, consumer: Consumer, running: list[Request]) -> None:
        """The grace is over: kill the jobs' pool processes and hand their messages back."""
        for request in running:
            if request.time_start:  # a pool process runs it (else the pool's flush drops it)
                request.cancel(consumer.pool, signal=signal.SIGKILL, emit_retry=False)
            hand_back(request)

    def stop(self, consumer: Consumer) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.deadline is not None and not self.done:
            # The consumer stopped mid-grace (its broker connection lost): no event loop ticks
            # while it reconnects, perhaps never (the stack's Redis died with it). End the grace
            # from a thread; a consumer back by then ticks again and this does nothing.
            log.warning("graceful shutdown: the broker is out of reach")
            self.arm_expiry()

    def arm_expiry(self, wait: float | None = None) -> None:
        """End the grace from a thread, unless the event loop is ticking then (see `expire`)."""
        assert self.deadline is not None
        if wait is None:
            wait = max(0.0, self.deadline - time.monotonic())
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.watchdog = threading.Timer(wait, self.expire)
        self.watchdog.daemon = True
        self.watchdog.start()

    def expire(self) -> None:
        """The grace ended: a ticking event loop does the work (`tick`); else exit now, running
        jobs' pool processes killed first (nothing can be handed back with the broker out of
        reach: their leases bring them back). The loop does not tick while the consumer
        reconnects, nor while a call in it retries the broker with no bound. Not through
        Celery's shutdown, which needs the pool's pipes served by the event loop."""
        if self.done:
            return
        if self.tref is not None and time.monotonic() - self.ticked < defaults.DRAIN_STALL:
            self.arm_expiry(defaults.DRAIN_STALL)  # look again, should the loop stop later
            return
        self.done = True
        log.warning(
            "graceful shutdown: the grace ended with the broker out of reach (no tick); exiting"
        )
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        logging.shutdown()
        os._exit(platforms.EX_OK)

    def shutdown(self, consumer: Consumer) -> None:
        self.stop(consumer)
