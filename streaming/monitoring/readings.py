"""Queue readings: live figures from RabbitMQ, and past ones from the stored samples.

The management HTTP API gives ready, unacked, consumers, rates and counters; when it is off or
does not answer, a passive declare of every subscribed queue gives ready and consumers only.
"""

from __future__ import annotations

import base64
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

import amqp
import orjson
import structlog
from django.conf import settings
from django.db.models import Max, QuerySet

from streaming.models import QueueSample
from streaming.publisher import amqp_params, connect
from streaming.reconciler import UNROUTABLE, queue_arguments
from subscriptions.models import Subscription
from subscriptions.topics import EVENT_CLASSES, QUEUE_PREFIX

log = structlog.get_logger(__name__)

MANAGEMENT_COLUMNS = "name,messages_ready,messages_unacknowledged,message_bytes,consumers,arguments,message_stats"


@dataclass
class QueueReading:
    queue: str
    service_name: str
    event_class: str
    source: str
    ready: int
    consumers: int
    unacked: int | None = None
    bytes: int | None = None
    max_length: int | None = None
    max_bytes: int | None = None
    message_ttl: int | None = None  # ms, x-message-ttl
    publish_rate: float | None = None
    consume_rate: float | None = None
    published: int | None = None  # counters since the queue was declared (management API only)
    delivered: int | None = None

    @property
    def depth(self) -> int:
        return self.ready + (self.unacked or 0)


def parse_queue_name(name: str) -> tuple[str, str] | None:
    """`ws-gateway.<service>.<class>` -> (service, class); None for every other queue."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != QUEUE_PREFIX or parts[2] not in EVENT_CLASSES:
        return None
    return parts[1], parts[2]


def read_queues_management(timeout: float = 10.0) -> list[QueueReading]:
    """Every gateway queue of the vhost, from the management API (same user as RABBITMQ_URL)."""
    params = amqp_params(settings.RABBITMQ_URL)
    vhost = quote(str(params["virtual_host"]), safe="")
    credentials = base64.b64encode(f"{params['userid']}:{params['password']}".encode()).decode()
    request = urllib.request.Request(
        f"{settings.RABBITMQ_MANAGEMENT_URL.rstrip('/')}/api/queues/{vhost}?columns={MANAGEMENT_COLUMNS}",
        headers={"Authorization": f"Basic {credentials}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        queues = orjson.loads(response.read())
    readings = []
    for q in queues:
        parsed = parse_queue_name(q["name"])
        if parsed is None:
            continue
        arguments = q.get("arguments") or {}
        stats = q.get("message_stats") or {}
        readings.append(
            QueueReading(
                queue=q["name"],
                service_name=parsed[0],
                event_class=parsed[1],
                source="management",
                ready=q.get("messages_ready") or 0,
                unacked=q.get("messages_unacknowledged") or 0,
                consumers=q.get("consumers") or 0,
                bytes=q.get("message_bytes"),
                max_length=arguments.get("x-max-length"),
                max_bytes=arguments.get("x-max-length-bytes"),
                message_ttl=arguments.get("x-message-ttl"),
                publish_rate=stats.get("publish_details", {}).get("rate", 0.0),
                consume_rate=stats.get("deliver_get_details", {}).get("rate", 0.0),
                published=stats.get("publish", 0),
                delivered=stats.get("deliver_get", 0) - stats.get("redeliver", 0),
            )
        )
    return readings


def read_queues_declare() -> list[QueueReading]:
    """The fallback: a passive declare of each queue a live subscription uses."""
    wanted = (
        Subscription.objects.filter(status__in=Subscription.LIVE_STATUSES)
        .values_list("queue_name", flat=True)
        .distinct()
    )
    conn = connect(settings.RABBITMQ_URL, name="ws-gateway monitor")
    readings = []
    try:
        channel = conn.channel()
        for name in sorted(wanted):
            parsed = parse_queue_name(name)
            if parsed is None:
                continue
            try:
                _, ready, consumers = channel.queue_declare(name, passive=True)
            except amqp.NotFound:
                channel = conn.channel()  # the broker closed the channel; the gateway declares it soon
                continue
            readings.append(
                QueueReading(
                    queue=name,
                    service_name=parsed[0],
                    event_class=parsed[1],
                    source="declare",
                    ready=ready,
                    consumers=consumers,
                    max_length=queue_arguments(parsed[1]).get("x-max-length"),
                )
            )
    finally:
        conn.close()
    return readings


def read_unroutable_depth() -> int | None:
    """Messages in ws-gateway.unroutable (a passive declare: current, unlike the management API's figures)."""
    conn = connect(settings.RABBITMQ_URL, name="ws-gateway monitor")
    try:
        _, depth, _ = conn.channel().queue_declare(UNROUTABLE, passive=True)
        return depth
    except amqp.NotFound:
        return None  # the gateway declares it; none yet
    finally:
        conn.close()


def read_queues() -> list[QueueReading]:
    """Management API when configured and answering, else passive declares; raises when both fail."""
    if settings.RABBITMQ_MANAGEMENT_URL:
        try:
            return read_queues_management()
        except (OSError, ValueError) as exc:
            log.warning("monitor.management_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
    return read_queues_declare()


def earlier_depths_by_queue(names: list[str], now: datetime) -> dict[str, list[int]]:
    """The last MONITOR_SLOW_SAMPLES depths of each queue, newest first, from recent samples only."""
    needed = settings.MONITOR_SLOW_SAMPLES
    since = now - timedelta(seconds=settings.MONITOR_INTERVAL * (needed + 1) * 2)
    depths: dict[str, list[int]] = defaultdict(list)
    rows = (
        QueueSample.objects.filter(queue__in=names, taken_at__gte=since)
        .order_by("queue", "-taken_at")
        .values_list("queue", "ready", "unacked")
    )
    for queue, ready, unacked in rows:
        if len(depths[queue]) < needed:
            depths[queue].append(ready + (unacked or 0))
    return depths


def last_dropped_estimates(names: list[str]) -> dict[str, int]:
    """Each queue's dropped_estimate in its latest sample that has one (a count since the queue was declared)."""
    rows = (
        QueueSample.objects.filter(queue__in=names, dropped_estimate__isnull=False)
        .order_by("queue", "-taken_at")
        .distinct("queue")
        .values_list("queue", "dropped_estimate")
    )
    return dict(rows)


def latest_samples() -> QuerySet[QueueSample]:
    """The samples of the most recent run: one per queue that exists now."""
    latest = QueueSample.objects.aggregate(at=Max("taken_at"))["at"]
    return QueueSample.objects.filter(taken_at=latest).order_by("queue") if latest else QueueSample.objects.none()
