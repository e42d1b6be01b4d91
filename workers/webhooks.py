"""The `bgq.deliver_webhook` task: POST a finished job's JSON to a callback URL, signed."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from celery import Task

from bgq import contract, defaults, webhooks
from bgq.errors import PermanentError, TransientError
from workers.app import app, settings
from workers.retry import backoff

log = logging.getLogger(__name__)


class WebhookFailed(TransientError):
    """The receiver did not accept the delivery (network error or a non-2xx answer)."""


@app.task(
    name=contract.WEBHOOK_TASK_NAME,
    bind=True,
    max_retries=defaults.WEBHOOK_MAX_RETRIES,
    queue=contract.WEBHOOK_QUEUE,
)
def deliver_webhook(self: Task, url: str, body: str) -> dict[str, Any]:
    """POST `body` to `url` with its HMAC-SHA256 signature; retry with backoff until a 2xx."""
    if not settings.webhook_secret:
        raise PermanentError("BGQ_WEBHOOK_SECRET is not set on this worker: cannot sign webhooks")
    webhooks.check_callback_url(url, settings.webhook_allow_private)  # again: DNS may have moved
    data = body.encode()
    event = "job.done" if json.loads(body).get("status") == "done" else "job.failed"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "bgq-webhook",
        webhooks.SIGNATURE_HEADER: webhooks.sign(settings.webhook_secret, data),
        webhooks.EVENT_HEADER: event,
    }
    try:
        response = httpx.post(url, content=data, headers=headers, timeout=defaults.WEBHOOK_TIMEOUT)
        problem = None if response.is_success else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return {"url": url, "status": response.status_code, "attempts": self.request.retries + 1}
    failure = WebhookFailed(f"delivery to {url} failed: {problem}")
    if self.request.retries >= self.max_retries:
        raise failure
    log.warning("%s; retry %d", failure, self.request.retries + 1)
    countdown = backoff(self.request.retries, defaults.WEBHOOK_BACKOFF_MAX)
    raise self.retry(exc=failure, countdown=countdown)
