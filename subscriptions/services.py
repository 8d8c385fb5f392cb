"""Writes that span models or have side effects: subscriptions, API keys, the gateway nudge."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

import structlog
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from kombu import Connection, Exchange, Producer

from subscriptions import topics
from subscriptions.models import SCOPES, ApiKey, Subscription, default_scopes

log = structlog.get_logger(__name__)

NUDGE_TIMEOUT = 2.0  # seconds; a broker outage must not hold up an API request
CONTROL_EXCHANGE = Exchange(topics.CONTROL_EXCHANGE, type="topic", durable=True)


def subscription_create(
    *,
    service_name: str,
    channel: str,
    category: str = "",
    symbol: str = "",
    depth: int | None = None,
    interval: str = "",
) -> tuple[Subscription, bool]:
    """Return the service's live subscription to this stream, creating it if needed; True if created.

    Raises TopicError for a request Bybit would not serve.
    """
    topics.check_service_name(service_name)
    topic = topics.resolve(channel, category, symbol, depth, interval)
    existing = live_subscription(service_name, topic.routing_key)
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            subscription = Subscription.objects.create(
                service_name=service_name,
                channel=topic.channel,
                category=topic.category,
                symbol=topic.symbol,
                depth=topic.depth,
                interval=topic.interval,
                event_class=topic.event_class,
                bybit_topic=topic.bybit_topic,
                routing_key=topic.routing_key,
                queue_name=topic.queue_name(service_name),
            )
    except IntegrityError:
        # A concurrent request created the same live row first (the partial unique constraint).
        existing = live_subscription(service_name, topic.routing_key)
        if existing is None:
            raise
        return existing, False
    log.info("subscription.created", id=str(subscription.id), service=service_name, topic=topic.bybit_topic)
    transaction.on_commit(lambda: nudge_gateway(reason="created", subscription_ids=[str(subscription.id)]))
    return subscription, True


def live_subscription(service_name: str, routing_key: str) -> Subscription | None:
    rows = Subscription.objects.filter(
        service_name=service_name, routing_key=routing_key, status__in=Subscription.LIVE_STATUSES
    )
    return rows.first()


def subscription_cancel(*, subscription: Subscription) -> Subscription:
    """Cancel a subscription (the row stays, with `cancelled_at`); cancelling twice is harmless."""
    if subscription.status == Subscription.Status.CANCELLED:
        return subscription
    now = timezone.now()
    updated = (
        Subscription.objects.filter(pk=subscription.pk)
        .exclude(status=Subscription.Status.CANCELLED)
        .update(status=Subscription.Status.CANCELLED, cancelled_at=now, updated_at=now)
    )
    subscription.refresh_from_db()
    if updated:
        log.info("subscription.cancelled", id=str(subscription.id), service=subscription.service_name)
        transaction.on_commit(lambda: nudge_gateway(reason="cancelled", subscription_ids=[str(subscription.id)]))
    return subscription


def subscriptions_cancel_for_service(*, service_name: str) -> int:
    """Cancel every subscription of a service that is not cancelled yet; return how many."""
    now = timezone.now()
    rows = Subscription.objects.filter(service_name=service_name).exclude(status=Subscription.Status.CANCELLED)
    ids = [str(pk) for pk in rows.values_list("id", flat=True)]
    count = rows.update(status=Subscription.Status.CANCELLED, cancelled_at=now, updated_at=now)
    if count:
        log.info("subscription.cancelled_for_service", service=service_name, count=count)
        transaction.on_commit(lambda: nudge_gateway(reason="cancelled", subscription_ids=ids))
    return count


def subscriptions_mark_active(*, ids: Iterable[str]) -> int:
    """These pending rows' topics are live and their queues get events now: they become active; return how many."""
    rows = Subscription.objects.filter(status=Subscription.Status.PENDING, id__in=list(ids))
    return rows.update(status=Subscription.Status.ACTIVE, error="", updated_at=timezone.now())


def subscriptions_mark_failed(*, category: str, topics: list[str] | None, message: str) -> int:
    """Bybit refused: live rows of these topics (every live row of `category` when None) fail."""
    rows = Subscription.objects.filter(status__in=Subscription.LIVE_STATUSES, category=category)
    if topics is not None:
        rows = rows.filter(bybit_topic__in=topics)
    return rows.update(status=Subscription.Status.FAILED, error=message[:1000], updated_at=timezone.now())


def subscriptions_record_last_events(*, seen: dict[tuple[str, str], float]) -> None:
    """Write a coarse `last_event_at` per (category, topic), to the second: one UPDATE per category and second.

    Called every few seconds with every topic that had an event; a feed of 600 topics is then a
    few UPDATEs a round, not 600.
    """
    by_second: dict[tuple[str, int], list[str]] = {}
    for (category, topic), ts in seen.items():
        by_second.setdefault((category, int(ts)), []).append(topic)
    for (category, second), topics_seen in by_second.items():
        rows = Subscription.objects.filter(
            status=Subscription.Status.ACTIVE, category=category, bybit_topic__in=topics_seen
        )
        rows.update(last_event_at=datetime.fromtimestamp(second, tz=UTC))


def api_key_issue(*, service_name: str, label: str = "", scopes: Iterable[str] | None = None) -> tuple[ApiKey, str]:
    """Create a key for a service; return it and the raw key, which is never stored or shown again.

    `scopes` defaults to market data only; raises ValueError for an unknown scope or none at all.
    """
    topics.check_service_name(service_name)
    wanted = set(default_scopes() if scopes is None else scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown or not wanted:
        raise ValueError(f"scopes must be one or more of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}")
    granted = [s for s in SCOPES if s in wanted]
    raw, prefix, key_hash = ApiKey.generate()
    key = ApiKey.objects.create(
        service_name=service_name, label=label, prefix=prefix, key_hash=key_hash, scopes=granted
    )
    log.info("api_key.issued", service=service_name, prefix=prefix, scopes=granted)
    return key, raw


def api_key_revoke(*, api_key: ApiKey) -> None:
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    log.info("api_key.revoked", service=api_key.service_name, prefix=api_key.prefix)


def nudge_gateway(*, reason: str, subscription_ids: list[str]) -> bool:
    """Tell the gateway to reconcile now; return False (and log) if RabbitMQ is unreachable.

    Losing a nudge costs only latency: the gateway also reconciles every few seconds.
    """
    message = {"event": topics.CONTROL_ROUTING_KEY, "reason": reason, "subscription_ids": subscription_ids,
               "ts": time.time()}  # fmt: skip
    try:
        with Connection(
            settings.RABBITMQ_URL, connect_timeout=NUDGE_TIMEOUT, ssl=settings.CELERY_BROKER_USE_SSL
        ) as conn:
            producer = Producer(conn.channel(), exchange=CONTROL_EXCHANGE, serializer="json")
            producer.publish(
                message,
                routing_key=topics.CONTROL_ROUTING_KEY,
                declare=[CONTROL_EXCHANGE],
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
            )
    except (OSError, ConnectionError, TimeoutError) as exc:
        log.warning("gateway.nudge_failed", reason=reason, error=f"{type(exc).__name__}: {exc}"[:200])
        return False
    except Exception as exc:  # noqa: BLE001 - kombu wraps broker errors in many types; never fail the request
        log.warning("gateway.nudge_failed", reason=reason, error=f"{type(exc).__name__}: {exc}"[:200])
        return False
    return True
