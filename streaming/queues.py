"""RabbitMQ declarations: the events exchange and the arguments of every service queue."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from subscriptions.topics import PRIVATE_CLASSES


def queue_arguments(event_class: str) -> dict[str, Any]:
    """Retention of a `ws-gateway.<service>.<class>` queue.

    Market data drops the oldest message when full (`drop-head`), so a slow consumer gets the
    freshest data; private classes refuse new messages instead (`reject-publish`): RabbitMQ
    nacks the publish and the gateway keeps and retries it, so nothing is lost silently.
    """
    arguments: dict[str, Any] = {}
    limit = settings.QUEUE_MAX_LENGTH.get(event_class, 0)
    if limit:
        arguments["x-max-length"] = limit
    if event_class in PRIVATE_CLASSES:
        arguments["x-overflow"] = "reject-publish"
    else:
        arguments["x-overflow"] = "drop-head"
        if settings.QUEUE_MARKET_TTL_MS:
            arguments["x-message-ttl"] = settings.QUEUE_MARKET_TTL_MS
    return arguments
