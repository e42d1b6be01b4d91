"""The `bgq.deliver_webhook` task: POST a finished job's JSON to a callback URL, signed."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import httpx
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from bgq import contract, defaults, fetch, webhooks
from bgq.errors import PermanentError, TransientError
from workers.app import app, settings
from workers.retry import backoff, retry_or_requeue

log = logging.getLogger(__name__)


class WebhookFailed(TransientError):
    """The receiver did not accept the delivery (network error or a non-2xx answer)."""


@functools.cache
def client() -> httpx.Client:
    """This pool process's client: it connects only to addresses the callback rule allows."""
    return fetch.guarded_client(settings.webhook_allow_private, settings.webhook_timeout)


@app.task(
    name=contract.WEBHOOK_TASK_NAME,
    bind=True,
    max_retries=settings.webhook_max_retries,
    queue=contract.WEBHOOK_QUEUE,
    soft_time_limit=2 * settings.webhook_timeout,  # a receiver that drips bytes is cut off
    time_limit=3 * settings.webhook_timeout,
)
def deliver_webhook(self: Task, url: str, body: str) -> dict[str, Any]:
    """POST `body` to `url` with its HMAC-SHA256 signature; retry with backoff until a 2xx."""
    if not settings.webhook_secret:
        raise PermanentError("BGQ_WEBHOOK_SECRET is not set on this worker: cannot sign webhooks")
    data = body.encode()
    event = "job.done" if json.loads(body).get("status") == "done" else "job.failed"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "bgq-webhook",
        webhooks.SIGNATURE_HEADER: webhooks.sign(settings.webhook_secret, data),
        webhooks.EVENT_HEADER: event,
    }
    status = 0
    try:
        webhooks.check_callback_url(url, settings.webhook_allow_private)  # DNS may have moved
        # The client checks the addresses again as it connects, and connects to a checked one.
        with client().stream("POST", url, content=data, headers=headers) as response:
            status = response.status_code  # the answer's body is never read
        problem = None if 200 <= status < 300 else f"HTTP {status}"
    except fetch.FetchFailed as exc:
        if exc.reason == "not_allowed":
            raise  # permanent, as CallbackNotAllowed above
        problem = str(exc)
    except webhooks.CallbackUnresolvable as exc:
        problem = str(exc)
    except (httpx.HTTPError, SoftTimeLimitExceeded) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return {"url": url, "status": status, "attempts": self.request.retries + 1}
    failure = WebhookFailed(f"delivery to {url} failed: {problem}")
    if self.request.retries >= self.max_retries:
        raise failure
    log.warning("%s; retry %d", failure, self.request.retries + 1)
    countdown = backoff(
        self.request.retries, defaults.WEBHOOK_BACKOFF_MAX, defaults.WEBHOOK_BACKOFF_BASE
    )
    retry_or_requeue(self, failure, countdown)  # Redis out of reach: requeued, never dropped
