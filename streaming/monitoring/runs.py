"""The monitor runs the beat tasks call: queues (read, sample, alert), the gateway, sample pruning."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import amqp
import redis
from django.conf import settings
from django.utils import timezone

from streaming.models import QueueSample
from streaming.monitoring.alerts import crossings, emit, run_alone, sync_alerts
from streaming.monitoring.checks import (
    GATEWAY_FAMILIES,
    QUEUE_FAMILIES,
    Alert,
    dropped_estimate,
    fill_ratio,
    gateway_alerts,
    queue_alerts,
    unroutable_alerts,
    worst,
)
from streaming.monitoring.readings import (
    earlier_depths_by_queue,
    last_dropped_estimates,
    read_queues,
    read_unroutable_depth,
)
from subscriptions.models import Subscription
from wsgateway.health import read_gateway_status


def monitor_queues() -> dict[str, Any]:
    """Read every gateway queue, store a sample each, raise and clear queue alerts."""
    return run_alone("queues", check_queues)


def check_queues(client: redis.Redis) -> dict[str, Any]:
    now = timezone.now()
    try:
        readings = read_queues()
        unroutable = read_unroutable_depth()
    except (OSError, amqp.AMQPError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
        unreachable = Alert("rabbitmq.unreachable", "rabbitmq", "critical", {"error": error})
        events = sync_alerts(client, ["rabbitmq"], [unreachable])
        emit(events)
        return {"queues": 0, "events": crossings(events), "error": error}
    names = [r.queue for r in readings]
    depths, dropped = earlier_depths_by_queue(names, now), last_dropped_estimates(names)
    samples, alerts, context = [], unroutable_alerts(unroutable), {}
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
                dropped_estimate=dropped_estimate(reading, dropped.get(reading.queue)),
                status=worst(found),
                alerts=[a.name for a in found],
            )
        )
    QueueSample.objects.bulk_create(samples)
    events = sync_alerts(client, QUEUE_FAMILIES, alerts, context)
    emit(events)
    return {"queues": len(samples), "events": crossings(events)}


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


def prune_samples() -> int:
    cutoff = timezone.now() - timedelta(hours=settings.MONITOR_SAMPLE_RETENTION_HOURS)
    deleted, _ = QueueSample.objects.filter(taken_at__lt=cutoff).delete()
    return deleted
