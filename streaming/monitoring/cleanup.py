"""Queues no live subscription uses: deleted on request (API, admin), or by a beat task once
QUEUE_DELETE_AFTER_HOURS have passed since their last subscription ended.

A queue of a live (pending or active) subscription is never deleted. The check and the delete
are two steps: a subscription created between them gets its queue back from the gateway, which
declares the queues of new rows when the API nudges it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import amqp
import structlog
from django.conf import settings
from django.db.models import Max
from django.utils import timezone

from streaming.monitoring.readings import parse_queue_name
from streaming.publisher import connect
from subscriptions.models import Subscription
from subscriptions.topics import PRIVATE_CLASSES

log = structlog.get_logger(__name__)

CONNECTION_NAME = "ws-gateway queue cleanup"


class QueueInUse(Exception):
    """Live subscriptions still deliver to this queue."""

    def __init__(self, queue: str, subscription_ids: list[str]) -> None:
        super().__init__(f"{len(subscription_ids)} live subscription(s) use {queue}: cancel them first")
        self.queue, self.subscription_ids = queue, subscription_ids


class QueueMissing(Exception):
    """RabbitMQ has no such queue."""


class QueueNotEmpty(Exception):
    """The delete asked for an empty queue and this one holds messages."""


@dataclass(frozen=True, slots=True)
class Ended:
    """A gateway queue no live subscription uses, and when its last subscription ended."""

    queue: str
    event_class: str
    ended_at: datetime


def live_subscription_ids(queue: str) -> list[str]:
    rows = Subscription.objects.filter(queue_name=queue, status__in=Subscription.LIVE_STATUSES)
    return [str(pk) for pk in rows.values_list("id", flat=True)]


def queue_delete(*, queue: str, if_empty: bool = False) -> int:
    """Delete a gateway queue no live subscription uses; return how many messages went with it.

    Raises QueueInUse, QueueMissing, or QueueNotEmpty (with `if_empty`; RabbitMQ checks it atomically).
    """
    conn = connect(settings.RABBITMQ_URL, name=CONNECTION_NAME)
    try:
        return delete_on(conn, queue, if_empty)
    finally:
        conn.close()


def delete_on(conn: amqp.Connection, queue: str, if_empty: bool) -> int:
    in_use = live_subscription_ids(queue)
    if in_use:
        raise QueueInUse(queue, in_use)
    # A refused passive declare or delete closes the channel itself; a successful one is closed here.
    channel = conn.channel()
    try:
        # RabbitMQ deletes a missing queue without complaint: look first, so a typo is a 404.
        channel.queue_declare(queue, passive=True)
    except amqp.NotFound:
        raise QueueMissing(queue) from None
    try:
        discarded = channel.queue_delete(queue, if_empty=if_empty)
    except amqp.PreconditionFailed:
        raise QueueNotEmpty(queue) from None
    channel.close()
    log.info("queue.deleted", queue=queue, messages=discarded)
    return discarded


def ended_queues() -> list[Ended]:
    """Every queue of a subscription row that no live row uses, with the time its last row ended."""
    live = set(Subscription.objects.filter(status__in=Subscription.LIVE_STATUSES).values_list("queue_name", flat=True))
    rows = (
        Subscription.objects.exclude(status__in=Subscription.LIVE_STATUSES)
        .values("queue_name")
        .annotate(ended_at=Max("updated_at"))
    )
    ended = []
    for row in rows:
        parsed = parse_queue_name(row["queue_name"])
        if parsed is not None and row["queue_name"] not in live:
            ended.append(Ended(row["queue_name"], parsed[1], row["ended_at"]))
    return sorted(ended, key=lambda e: e.queue)


def past_grace(ended: list[Ended], now: datetime, grace: timedelta) -> list[Ended]:
    """The queues whose last subscription ended more than `grace` ago."""
    return [e for e in ended if e.ended_at <= now - grace]


def delete_unused_queues() -> dict[str, Any]:
    """Delete the queues past their grace period; a private queue only when empty (never its events)."""
    hours = settings.QUEUE_DELETE_AFTER_HOURS
    if not hours:
        return {"deleted": {}, "kept": []}
    due = past_grace(ended_queues(), timezone.now(), timedelta(hours=hours))
    deleted, kept = {}, []
    if not due:
        return {"deleted": deleted, "kept": kept}
    conn = connect(settings.RABBITMQ_URL, name=CONNECTION_NAME)
    try:
        for queue in due:
            try:
                deleted[queue.queue] = delete_on(conn, queue.queue, if_empty=queue.event_class in PRIVATE_CLASSES)
            except (QueueInUse, QueueMissing):
                continue  # subscribed again since, or deleted already
            except QueueNotEmpty:
                kept.append(queue.queue)
    finally:
        conn.close()
    if kept:
        log.warning("queue.kept_with_private_events", queues=kept)
    return {"deleted": deleted, "kept": kept}
