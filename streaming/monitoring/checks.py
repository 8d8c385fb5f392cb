"""Pure checks: a queue reading or the gateway's status record -> the alerts now true."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from streaming.monitoring.readings import QueueReading
from streaming.reconciler import UNROUTABLE

QUEUE_FAMILIES = (
    "queue.backlog", "queue.retention", "queue.no_consumer", "queue.slow_consumer", "queue.unroutable", "rabbitmq",
)  # fmt: skip
GATEWAY_FAMILIES = (
    "gateway.status",
    "gateway.socket",
    "gateway.circuit",
    "gateway.publisher",
    "gateway.private_auth_failed",
    "gateway.quarantined",
    "gateway.backfill_failed",
    "gateway.market_dropped",
    "gateway.reading_late",
    "queue.private_rejecting",
)
LEVELS = ("warning", "critical")
# Drop-head discards only while a queue holds its limit of ready messages. The management
# figures are a few seconds old, so a queue this close to its limit counts as full.
FULL_AT = 0.95


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


def fill_ratio(reading: QueueReading) -> float | None:
    ratios = []
    if reading.max_length:
        ratios.append(reading.depth / reading.max_length)
    if reading.max_bytes and reading.bytes is not None:
        ratios.append(reading.bytes / reading.max_bytes)
    return max(ratios) if ratios else None


def can_drop(reading: QueueReading) -> bool:
    """Whether the queue may be discarding messages now: ready messages at its limit, or a message TTL."""
    if reading.message_ttl:
        return True
    if reading.max_length and reading.ready >= reading.max_length * FULL_AT:
        return True
    return bool(reading.max_bytes and reading.bytes is not None and reading.bytes >= reading.max_bytes * FULL_AT)


def dropped_estimate(reading: QueueReading, previous: int | None = None) -> int | None:
    """Messages lost to overflow (or TTL) since the queue was declared; None without counters.

    While the queue can drop, it is what the queue received minus what it delivered minus what it
    holds. Otherwise nothing can have been dropped since `previous` (the last estimate), which
    stands: the counters come from different RabbitMQ processes and lag each other by seconds,
    so on a busy queue far from full the subtraction shows hundreds of drops that never happened.
    """
    if reading.published is None or reading.delivered is None:
        return None
    if not can_drop(reading):
        return previous or 0
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


def unroutable_alerts(depth: int | None) -> list[Alert]:
    """Messages in ws-gateway.unroutable: events the exchange had no queue for (a queue or binding is missing)."""
    if not depth:
        return []
    return [Alert("queue.unroutable", UNROUTABLE, "warning", {"depth": depth})]


def private_alerts(private: dict[str, Any]) -> list[Alert]:
    """A queue refusing private events (full, or gone): the gateway parks them; critical once it spills them."""
    parked, spilling, spilled = private.get("parked") or {}, private.get("spilling") or [], private.get("spilled") or {}
    alerts = []
    for queue in sorted(set(parked) | set(spilling)):
        details = {"parked": parked.get(queue, 0), "spilled": spilled.get(queue, 0), "spilling": queue in spilling}
        if queue in spilling:
            alerts.append(Alert("queue.private_rejecting.critical", queue, "critical", details))
        else:
            alerts.append(Alert("queue.private_rejecting.warning", queue, "warning", details))
    return alerts


def worst(alerts: Iterable[Alert]) -> str:
    severities = {a.severity for a in alerts}
    return "critical" if "critical" in severities else "warning" if "warning" in severities else "ok"


def gateway_alerts(status: dict[str, Any] | None, now: float) -> list[Alert]:
    """What the gateway's status record says is wrong: missing or stale, sockets down, auth refused, circuits open,
    quarantine, queues refusing private events."""
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
        if socket.get("auth_error"):
            details = {k: socket.get(k) for k in ("auth_error", "auth_failures", "auth_failing_since")}
            alerts.append(Alert("gateway.private_auth_failed", socket.get("name", "?"), "critical", details))
    # One breaker per endpoint; a record from before that has only the one "circuit".
    circuits = status.get("circuits") or {"gateway": status.get("circuit") or {}}
    for endpoint, circuit in circuits.items():
        if circuit.get("state") == "open":
            details = {"next_attempt_at": circuit.get("next_attempt_at")}
            alerts.append(Alert("gateway.circuit.open", endpoint, "critical", details))
    publisher = status.get("publisher") or {}
    if publisher and not publisher.get("connected"):
        alerts.append(Alert("gateway.publisher.down", "gateway", "critical", {"error": publisher.get("last_error")}))
    quarantined_at = status.get("quarantined_at")
    if quarantined_at is not None and now - quarantined_at <= settings.MONITOR_QUARANTINE_ALERT_FOR:
        # Up while private items keep going to `<class>.unknown`: each new one renews it.
        details = {
            "count": (status.get("counters") or {}).get("quarantined"),
            "by_reason": status.get("quarantined_by_reason") or {},
            "last_at": quarantined_at,
        }
        alerts.append(Alert("gateway.quarantined", "gateway", "warning", details))
    if publisher.get("blocked"):
        # A RabbitMQ resource alarm (memory or disk): nothing is published until it clears.
        alerts.append(Alert("gateway.publisher.blocked", "gateway", "critical", {}))
    counters = status.get("counters") or {}
    if counters.get("dropped"):
        # The hand-off was full (conflation could not keep up): market events were lost to consumers.
        alerts.append(Alert("gateway.market_dropped", "gateway", "warning", {"events": counters["dropped"]}))
    pacing = status.get("pacing") or {}
    if pacing.get("behind"):
        # Reading its sockets late, or consumers behind: books and tickers go out at most once per
        # interval, as their newest state.
        details = {"interval_ms": pacing.get("interval_ms"), "consumers_behind": bool(pacing.get("consumers_behind"))}
        alerts.append(Alert("gateway.reading_late", "gateway", "warning", details))
    if counters.get("unencodable"):
        alerts.append(Alert("gateway.publisher.unencodable", "gateway", "warning", {"events": counters["unencodable"]}))
    balances = status.get("balances") or {}
    if balances.get("rejected"):
        alerts.append(Alert("gateway.balances.rejected", "gateway", "warning", {"rows": balances["rejected"]}))
    recovery = status.get("recovery") or {}
    if recovery.get("last_error"):
        details = {"error": recovery["last_error"], "failing_since": recovery.get("failing_since")}
        alerts.append(Alert("gateway.backfill_failed", "gateway", "critical", details))
    alerts += private_alerts(status.get("private") or {})
    return alerts
