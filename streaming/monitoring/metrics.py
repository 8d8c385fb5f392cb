"""GET /metrics: Prometheus text built at scrape time from the gateway's status record and the
monitor's latest queue samples, so web processes keep no metric state of their own.

Names are stable (dashboards and alert rules depend on them); see docs/monitoring.md.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import redis
import structlog
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streaming.monitoring.alerts import active_alerts
from streaming.monitoring.readings import latest_samples
from wsgateway.health import read_gateway_status, redis_client

log = structlog.get_logger(__name__)

# status record counter -> (metric name without _total, help)
GATEWAY_COUNTERS = {
    "frames_in": ("wsgateway_gateway_frames_in", "WebSocket frames received from Bybit"),
    "events": ("wsgateway_gateway_events", "Events built from Bybit frames"),
    "published": ("wsgateway_gateway_published", "Events published to RabbitMQ"),
    "confirmed": ("wsgateway_gateway_confirmed", "Publishes confirmed by RabbitMQ"),
    "republished": ("wsgateway_gateway_republished", "Events published again after a broker reconnect"),
    "nacked": ("wsgateway_gateway_nacked", "Publishes RabbitMQ refused (kept and retried for private events)"),
    "returned": ("wsgateway_gateway_returned", "Private publishes RabbitMQ returned: their queue was gone (retried)"),
    "spilled": ("wsgateway_gateway_spilled", "Private events sent to <queue>.overflow: its parked set was full"),
    "reordered": ("wsgateway_gateway_reordered", "Private events a queue took while an earlier one was refused"),
    "dropped": ("wsgateway_gateway_dropped", "Market events dropped by the hand-off policy"),
    "conflated": ("wsgateway_gateway_conflated", "Book and ticker frames folded into their topic's newest state"),
    "malformed": ("wsgateway_gateway_malformed", "Bybit frames that could not be used"),
    "unencodable": ("wsgateway_gateway_unencodable", "Events AMQP cannot carry (routing key > 255 bytes), set aside"),
}
# QueueSample field -> (metric name, help)
QUEUE_GAUGES = {
    "depth": ("wsgateway_queue_messages", "Messages in the queue (ready + unacked)"),
    "ready": ("wsgateway_queue_messages_ready", "Messages waiting for a consumer"),
    "unacked": ("wsgateway_queue_messages_unacked", "Messages delivered and not yet acknowledged"),
    "consumers": ("wsgateway_queue_consumers", "Consumers attached"),
    "max_length": ("wsgateway_queue_max_length", "x-max-length of the queue"),
    "fill": ("wsgateway_queue_fill_ratio", "Depth over the queue's limit (0..1)"),
    "publish_rate": ("wsgateway_queue_publish_rate", "Messages per second into the queue"),
    "consume_rate": ("wsgateway_queue_consume_rate", "Messages per second delivered to consumers"),
    "dropped_estimate": ("wsgateway_queue_dropped_estimate", "Messages lost to overflow or TTL, estimated"),
}
STATUS_VALUES = {"ok": 0, "warning": 1, "critical": 2}
QUEUE_LABELS = ["queue", "service", "event_class"]


def gateway_metrics(status: dict[str, Any] | None, now: float) -> Iterator[Metric]:
    up = GaugeMetricFamily("wsgateway_gateway_up", "1 while the gateway's status record is fresh")
    age = now - status.get("updated_at", 0) if status else None
    up.add_metric([], 1 if age is not None and age <= settings.GATEWAY_STATUS_STALE_AFTER else 0)
    yield up
    if status is None:
        return
    family = GaugeMetricFamily("wsgateway_gateway_status_age_seconds", "Seconds since the gateway wrote its status")
    family.add_metric([], max(0.0, age))
    yield family
    counters = status.get("counters", {})
    for key, (name, help_text) in GATEWAY_COUNTERS.items():
        family = CounterMetricFamily(name, help_text)
        family.add_metric([], counters.get(key, 0))
        yield family
    for key, name, help_text in (
        ("handoff_depth", "wsgateway_gateway_handoff_depth", "Events waiting between the sockets and the publisher"),
        ("in_flight", "wsgateway_gateway_in_flight", "Publishes waiting for a broker confirm"),
    ):
        family = GaugeMetricFamily(name, help_text)
        family.add_metric([], status.get(key, 0))
        yield family
    pacing = status.get("pacing") or {}
    for name, help_text, value in (
        ("wsgateway_gateway_reading_late", "1 while the gateway reads its sockets late and paces books and tickers",
         int(bool(pacing.get("behind")))),
        ("wsgateway_gateway_pacing_interval_ms", "While reading late, how often a book or ticker topic may go out (ms)",
         pacing.get("interval_ms", 0)),
    ):  # fmt: skip
        family = GaugeMetricFamily(name, help_text)
        family.add_metric([], value)
        yield family
    quarantined = CounterMetricFamily(
        "wsgateway_gateway_quarantined",
        "Private items published to <class>.unknown instead of their routing key, by reason",
        labels=["reason"],
    )
    for reason, count in sorted((status.get("quarantined_by_reason") or {}).items()):
        quarantined.add_metric([reason], count)
    yield quarantined
    parked = GaugeMetricFamily(
        "wsgateway_gateway_private_parked", "Private events held back because their queue refused", labels=["queue"]
    )
    for queue, count in sorted(((status.get("private") or {}).get("parked") or {}).items()):
        parked.add_metric([queue], count)
    yield parked
    recovery = status.get("recovery") or {}
    backfills = CounterMetricFamily("wsgateway_gateway_backfills", "Back-fills of private events from Bybit's REST API")
    backfills.add_metric([], recovery.get("backfills", 0))
    failing = GaugeMetricFamily(
        "wsgateway_gateway_backfill_failing", "1 while back-filling from Bybit's REST API fails"
    )
    failing.add_metric([], 1 if recovery.get("last_error") else 0)
    yield from (backfills, failing)
    circuit = GaugeMetricFamily("wsgateway_gateway_circuit_open", "1 while a Bybit circuit breaker is open")
    circuit.add_metric([], 1 if (status.get("circuit") or {}).get("state") == "open" else 0)
    yield circuit
    endpoints = GaugeMetricFamily(
        "wsgateway_gateway_endpoint_circuit_open", "1 while the endpoint's circuit breaker is open", labels=["endpoint"]
    )
    for endpoint, state in (status.get("circuits") or {}).items():
        endpoints.add_metric([endpoint], 1 if state.get("state") == "open" else 0)
    yield endpoints
    connected = GaugeMetricFamily(
        "wsgateway_gateway_socket_connected", "1 while a Bybit socket is connected", labels=["socket", "category"]
    )
    topics = GaugeMetricFamily("wsgateway_gateway_socket_topics", "Topics live on a socket", labels=["socket"])
    reconnects = CounterMetricFamily("wsgateway_gateway_socket_reconnects", "Reconnects of a socket", labels=["socket"])
    auth_failures = CounterMetricFamily(
        "wsgateway_gateway_socket_auth_failures", "Auth requests Bybit refused on a socket", labels=["socket"]
    )
    for socket in status.get("sockets", []):
        connected.add_metric([socket["name"], socket.get("category") or ""], 1 if socket["state"] == "connected" else 0)
        topics.add_metric([socket["name"]], socket.get("topics", 0))
        reconnects.add_metric([socket["name"]], socket.get("reconnects", 0))
        if socket.get("category") == "private":
            auth_failures.add_metric([socket["name"]], socket.get("auth_failures", 0))
    yield from (connected, topics, reconnects, auth_failures)


def queue_metrics() -> Iterator[Metric]:
    families = {key: GaugeMetricFamily(name, text, labels=QUEUE_LABELS) for key, (name, text) in QUEUE_GAUGES.items()}
    status = GaugeMetricFamily("wsgateway_queue_status", "0 ok, 1 warning, 2 critical", labels=QUEUE_LABELS)
    for sample in latest_samples():
        labels = [sample.queue, sample.service_name, sample.event_class]
        for field, family in families.items():
            value = getattr(sample, field)
            if value is not None:
                family.add_metric(labels, value)
        status.add_metric(labels, STATUS_VALUES[sample.status])
    yield from families.values()
    yield status


def alert_metrics(active: list[dict[str, Any]]) -> Iterator[Metric]:
    family = GaugeMetricFamily("wsgateway_alerts_active", "Alerts firing now, by name", labels=["alert"])
    for name, count in sorted(Counter(a["alert"] for a in active).items()):
        family.add_metric([name], count)
    yield family


class ScrapeCollector:
    def collect(self) -> Iterator[Metric]:
        client = redis_client(5.0)
        try:
            status = read_gateway_status(client)
            active = active_alerts(client)
        except redis.RedisError as exc:
            # Still serve the queue figures; wsgateway_gateway_up 0 says the rest is unknown.
            log.warning("metrics.redis_unavailable", error=type(exc).__name__)
            status, active = None, []
        finally:
            client.close()
        yield from gateway_metrics(status, time.time())
        yield from queue_metrics()
        yield from alert_metrics(active)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
