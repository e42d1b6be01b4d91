"""Celery configuration for bgq's producers and workers; every value comes from bgq.settings."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from bgq import connections, contract, defaults
from bgq.settings import Settings


def build(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for these settings (raises ConfigError when no broker is known)."""
    return {
        **connections.celery_connection(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": defaults.RESULT_TTL,
        "task_default_queue": contract.QUEUE,
        # A worker takes its next task from the first of these that has one (in this order,
        # whatever -Q says: bgq.lanes.LaneOrder): interactive jobs of each model it serves
        # (BGQ_MODELS), webhook deliveries, the prune, and bulk jobs last. Bulk runs wait in
        # their own lists until bgq/lanes.py lets them into their model's bulk queue.
        "task_queues": [Queue(name) for name in contract.consume_order(settings.served_models)],
        "task_routes": {
            contract.WEBHOOK_TASK_NAME: {"queue": contract.WEBHOOK_QUEUE},
            contract.PRUNE_TASK_NAME: {"queue": contract.MAINTENANCE_QUEUE},
        },
        # `bgq beat` sends the prune; the workers run it with their BGQ_CACHE_* settings.
        "beat_schedule": {
            "bgq-prune-cache": {
                "task": contract.PRUNE_TASK_NAME,
                "schedule": defaults.PRUNE_INTERVAL,
                "options": {"expires": defaults.PRUNE_INTERVAL},
            }
        },
        # Task events, so Flower shows every task with its state and runtime.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "task_time_limit": defaults.TASK_TIME_LIMIT,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.concurrency,
        "worker_max_tasks_per_child": settings.max_tasks_per_child,
        "worker_max_memory_per_child": settings.max_memory_per_child_mb * 1024,  # KiB
        "worker_hijack_root_logger": False,
    }
