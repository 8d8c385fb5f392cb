"""Beat tasks: thin wrappers over the monitor runs (schedule in settings.CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from streaming.monitoring import cleanup, runs


@shared_task
def monitor_queues() -> dict[str, Any]:
    """Sample every gateway queue; raise and clear backlog, retention and slow-consumer alerts."""
    return runs.monitor_queues()


@shared_task
def monitor_gateway() -> dict[str, Any]:
    """Check the gateway's status record and flag stale subscriptions."""
    return runs.monitor_gateway()


@shared_task
def prune_queue_samples() -> int:
    """Delete queue samples older than MONITOR_SAMPLE_RETENTION_HOURS."""
    return runs.prune_samples()


@shared_task
def delete_unused_queues() -> dict[str, Any]:
    """Delete service queues no live subscription has used for QUEUE_DELETE_AFTER_HOURS."""
    return cleanup.delete_unused_queues()
