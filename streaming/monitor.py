"""Queue and gateway monitoring: the plain functions the beat tasks call (streaming/tasks.py).

Queue figures come from RabbitMQ's management HTTP API (ready, unacked, consumers, rates and
counters) or, when it is off or does not answer, from a passive declare of every subscribed
queue (ready and consumers only). Each run stores a `QueueSample` per queue.

Alerts live in one Redis hash, so each fires once when its threshold is crossed and once more
when it clears, never every tick: a structured log event named after the alert
(`queue.backlog.critical`, ...) and, when ALERT_WEBHOOK_URL is set, one JSON POST.
"""

from __future__ import annotations

import base64
import itertools
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import amqp
import orjson
import redis
import structlog
from django.conf import settings
from django.db.models import Max, QuerySet
from django.utils import timezone

from streaming.models import QueueSample
from streaming.publisher import amqp_params, connect
from streaming.reconciler import queue_arguments
from subscriptions.models import Subscription
from subscriptions.topics import EVENT_CLASSES, QUEUE_PREFIX
from wsgateway.health import read_gateway_status, redis_client

log = structlog.get_logger(__name__)

QUEUE_FAMILIES = ("queue.backlog", "queue.retention", "queue.no_consumer", "queue.slow_consumer", "rabbitmq")
GATEWAY_FAMILIES = ("gateway.status", "gateway.socket", "gateway.circuit", "gateway.publisher")
MANAGEMENT_COLUMNS = "name,messages_ready,messages_unacknowledged,message_bytes,consumers,arguments,message_stats"
LEVELS = ("warning", "critical")


@dataclass
class Alert:
    name: str  # stable: queue.backlog.critical, gateway.status.stale, ...
    subject: str  # the queue, socket or subscription it is about
    severity: str  # warning | critical
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The name without its level: warning -> critical of one family is one crossing."""
        head, _, last = self.name.rpartition(".")
        return head if last in LEVELS else self.name

    @property
    def key(self) -> str:
        return f"{self.family}|{self.subject}"


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


# Reading RabbitMQ.


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


def read_queues() -> list[QueueReading]:
    """Management API when configured and answering, else passive declares; raises when both fail."""
    if settings.RABBITMQ_MANAGEMENT_URL:
        try:
            return read_queues_management()
        except (OSError, ValueError) as exc:
            log.warning("monitor.management_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
    return read_queues_declare()


# Judging a reading.


def fill_ratio(reading: QueueReading) -> float | None:
    ratios = []
    if reading.max_length:
        ratios.append(reading.depth / reading.max_length)
    if reading.max_bytes and reading.bytes is not None:
        ratios.append(reading.bytes / reading.max_bytes)
    return max(ratios) if ratios else None


def dropped_estimate(reading: QueueReading) -> int | None:
    """Messages the queue received that were neither delivered nor are still in it: overflow (and TTL)."""
    if reading.published is None or reading.delivered is None:
        return None
    return max(0, reading.published - reading.delivered - reading.ready)


def is_slow(reading: QueueReading, earlier_depths: list[int]) -> bool:
    """Consumers present, and the depth grew at each of the last MONITOR_SLOW_SAMPLES samples."""
    needed = settings.MONITOR_SLOW_SAMPLES
    if reading.consumers == 0 or len(earlier_depths) < needed:
        return False
    series = [*reversed(earlier_depths[:needed]), reading.depth]  # oldest first
    return all(later > earlier for earlier, later in itertools.pairwise(series))


def queue_alerts(reading: QueueReading, fill: float | None, earlier_depths: list[int]) -> list[Alert]:
    figures = {
        "service": reading.service_name,
        "event_class": reading.event_class,
        "depth": reading.depth,
        "consumers": reading.consumers,
        "fill": None if fill is None else round(fill, 4),
        "max_length": reading.max_length,
        "publish_rate": reading.publish_rate,
        "consume_rate": reading.consume_rate,
    }
    alerts = []
    if reading.depth >= settings.MONITOR_BACKLOG_CRITICAL:
        alerts.append(Alert("queue.backlog.critical", reading.queue, "critical", figures))
    elif reading.depth >= settings.MONITOR_BACKLOG_WARNING:
        alerts.append(Alert("queue.backlog.warning", reading.queue, "warning", figures))
    if fill is not None and fill >= settings.MONITOR_RETENTION_CRITICAL:
        alerts.append(Alert("queue.retention.critical", reading.queue, "critical", figures))
    elif fill is not None and fill >= settings.MONITOR_RETENTION_WARNING:
        alerts.append(Alert("queue.retention.warning", reading.queue, "warning", figures))
    if reading.depth > 0 and reading.consumers == 0:
        alerts.append(Alert("queue.no_consumer", reading.queue, "warning", figures))
    if is_slow(reading, earlier_depths):
        alerts.append(Alert("queue.slow_consumer", reading.queue, "warning", figures))
    return alerts


def worst(alerts: Iterable[Alert]) -> str:
    severities = {a.severity for a in alerts}
    return "critical" if "critical" in severities else "warning" if "warning" in severities else "ok"


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


# Alert state: fire on crossing, resolve on clearing.


def alerts_key() -> str:
    return f"{settings.REDIS_KEY_PREFIX}monitor:alerts"


def active_alerts(client: redis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(v) for v in client.hgetall(alerts_key()).values()]


def sync_alerts(
    client: redis.Redis, families: Iterable[str], alerts: list[Alert], context: dict[str, dict] | None = None
) -> list[dict[str, Any]]:
    """Store the alerts now true for `families`; return the crossings (fired, escalated, resolved).

    `context` maps a subject to its current figures, reported with its resolved events.
    """
    families = set(families)
    stored = {k.decode(): orjson.loads(v) for k, v in client.hgetall(alerts_key()).items()}
    now = time.time()
    events: list[dict[str, Any]] = []
    current = {a.key: a for a in alerts}
    updates: dict[str, bytes] = {}
    for key, alert in current.items():
        before = stored.get(key)
        if before and before["alert"] == alert.name:
            continue
        record = {
            "alert": alert.name,
            "state": "firing",
            "severity": alert.severity,
            "subject": alert.subject,
            "since": now,
            "details": alert.details,
        }
        updates[key] = orjson.dumps(record)
        events.append({**record, "previous": before["alert"] if before else None})
    gone = [key for key in stored if key.split("|", 1)[0] in families and key not in current]
    for key in gone:
        before = stored[key]
        events.append(
            {
                "alert": before["alert"],
                "state": "resolved",
                "severity": before["severity"],
                "subject": before["subject"],
                "since": before["since"],
                "details": (context or {}).get(before["subject"], {}),
            }
        )
    pipe = client.pipeline()
    if updates:
        pipe.hset(alerts_key(), mapping=updates)
    if gone:
        pipe.hdel(alerts_key(), *gone)
    pipe.execute()
    return events


def crossings(events: list[dict[str, Any]]) -> list[str]:
    """`alert:state` of each event: what a task returns, for Flower and the tests."""
    return [f"{e['alert']}:{e['state']}" for e in events]


def emit(events: list[dict[str, Any]]) -> None:
    """Each crossing as a log event named after the alert, then (if configured) one POST each."""
    for event in events:
        level = "info" if event["state"] == "resolved" else "error" if event["severity"] == "critical" else "warning"
        fields = {k: v for k, v in event.items() if k != "alert"}
        getattr(log, level)(event["alert"], **fields)
    if settings.ALERT_WEBHOOK_URL and events:
        post_webhook(settings.ALERT_WEBHOOK_URL, events)


def post_webhook(url: str, events: list[dict[str, Any]]) -> int:
    """One POST per event, one try each; the first failure skips the rest of this run. Returns how many went."""
    sent = 0
    for event in events:
        request = urllib.request.Request(
            url, data=orjson.dumps(event), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.ALERT_WEBHOOK_TIMEOUT):
                sent += 1
        except (OSError, urllib.error.HTTPError) as exc:
            # The URL may carry a token: name only its host.
            log.warning(
                "alert.webhook_failed",
                host=urlsplit(url).hostname,
                error=type(exc).__name__ + (f" {exc.code}" if isinstance(exc, urllib.error.HTTPError) else ""),
                undelivered=len(events) - sent,
            )
            break
    return sent


def run_alone(name: str, check: Callable[[redis.Redis], dict[str, Any]]) -> dict[str, Any]:
    """Run a check with a Redis client, at most one at a time even when a worker is slow and beat keeps ticking."""
    client = redis_client(5.0)
    lock = f"{settings.REDIS_KEY_PREFIX}monitor:lock:{name}"
    try:
        if not client.set(lock, "1", nx=True, ex=max(30, int(settings.MONITOR_INTERVAL * 2))):
            log.info("monitor.skipped", check=name, reason="a previous run is still going")
            return {"skipped": True}
        try:
            return check(client)
        finally:
            client.delete(lock)
    finally:
        client.close()


# The two checks the tasks run.


def monitor_queues() -> dict[str, Any]:
    """Read every gateway queue, store a sample each, raise and clear queue alerts."""
    return run_alone("queues", check_queues)


def check_queues(client: redis.Redis) -> dict[str, Any]:
    now = timezone.now()
    try:
        readings = read_queues()
    except (OSError, amqp.AMQPError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
        unreachable = Alert("rabbitmq.unreachable", "rabbitmq", "critical", {"error": error})
        events = sync_alerts(client, ["rabbitmq"], [unreachable])
        emit(events)
        return {"queues": 0, "events": crossings(events), "error": error}
    depths = earlier_depths_by_queue([r.queue for r in readings], now)
    samples, alerts, context = [], [], {}
    for reading in readings:
        fill = fill_ratio(reading)
        found = queue_alerts(reading, fill, depths.get(reading.queue, []))
        alerts.extend(found)
        context[reading.queue] = {"service": reading.service_name, "depth": reading.depth, "fill": fill}
        samples.append(
            QueueSample(
                queue=reading.queue,
                service_name=reading.service_name,
                event_class=reading.event_class,
                taken_at=now,
                source=reading.source,
                ready=reading.ready,
                unacked=reading.unacked,
                consumers=reading.consumers,
                max_length=reading.max_length,
                fill=fill,
                publish_rate=reading.publish_rate,
                consume_rate=reading.consume_rate,
                dropped_estimate=dropped_estimate(reading),
                status=worst(found),
                alerts=[a.name for a in found],
            )
        )
    QueueSample.objects.bulk_create(samples)
    events = sync_alerts(client, QUEUE_FAMILIES, alerts, context)
    emit(events)
    return {"queues": len(samples), "events": crossings(events)}


def gateway_alerts(status: dict[str, Any] | None, now: float) -> list[Alert]:
    """What the gateway's status record says is wrong: missing or stale, sockets down, circuit open."""
    if status is None:
        return [Alert("gateway.status.stale", "gateway", "critical", {"reason": "no status record"})]
    age = now - status.get("updated_at", 0)
    if age > settings.GATEWAY_STATUS_STALE_AFTER:
        return [Alert("gateway.status.stale", "gateway", "critical", {"age_s": round(age, 1)})]
    if status.get("state") != "running":
        return []  # starting or shutting down: only its freshness counts
    alerts = []
    for socket in status.get("sockets", []):
        if socket.get("state") != "connected":
            details = {k: socket.get(k) for k in ("state", "category", "last_error", "reconnects")}
            alerts.append(Alert("gateway.socket.down", socket.get("name", "?"), "critical", details))
    circuit = status.get("circuit") or {}
    if circuit.get("state") == "open":
        details = {"next_attempt_at": circuit.get("next_attempt_at")}
        alerts.append(Alert("gateway.circuit.open", "gateway", "critical", details))
    publisher = status.get("publisher") or {}
    if publisher and not publisher.get("connected"):
        alerts.append(Alert("gateway.publisher.down", "gateway", "critical", {"error": publisher.get("last_error")}))
    return alerts


def monitor_gateway() -> dict[str, Any]:
    """Gateway liveness from its status record, and stale subscriptions while it is alive."""
    return run_alone("gateway", check_gateway)


def check_gateway(client: redis.Redis) -> dict[str, Any]:
    alerts = gateway_alerts(read_gateway_status(client), time.time())
    events = sync_alerts(client, GATEWAY_FAMILIES, alerts)
    # A dead gateway makes every subscription stale: one gateway alert says it, not hundreds.
    if not any(a.name == "gateway.status.stale" for a in alerts):
        stale = [
            Alert(
                "subscription.stale",
                str(row.id),
                "warning",
                {"service": row.service_name, "topic": row.bybit_topic, "category": row.category,
                 "last_event_at": row.last_event_at.isoformat() if row.last_event_at else None},
            )
            for row in Subscription.stale_rows()
        ]  # fmt: skip
        events += sync_alerts(client, ["subscription.stale"], stale)
    emit(events)
    return {"alerts": [a.name for a in alerts], "events": crossings(events)}


def latest_samples() -> QuerySet[QueueSample]:
    """The samples of the most recent run: one per queue that exists now."""
    latest = QueueSample.objects.aggregate(at=Max("taken_at"))["at"]
    return QueueSample.objects.filter(taken_at=latest).order_by("queue") if latest else QueueSample.objects.none()


def prune_samples() -> int:
    cutoff = timezone.now() - timedelta(hours=settings.MONITOR_SAMPLE_RETENTION_HOURS)
    deleted, _ = QueueSample.objects.filter(taken_at__lt=cutoff).delete()
    return deleted
