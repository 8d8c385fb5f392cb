"""Desired state -> Bybit: which topics the subscriptions table wants, and where they live.

The database and AMQP work here is synchronous and runs on the gateway's single I/O thread,
never on the event loop. `assign` is pure: it spreads wanted topics over sockets within
Bybit's per-connection limits, keeping every topic on the socket that already holds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import amqp
import structlog
from django.db import close_old_connections
from django.utils import timezone

from streaming.protocol import fits
from streaming.publisher import connect
from streaming.queues import queue_arguments
from subscriptions.models import Subscription
from subscriptions.topics import EXCHANGE

log = structlog.get_logger(__name__)

PRIVATE = "private"
CANCELLED_LOOKBACK = timedelta(days=1)  # bindings of rows cancelled while the gateway was down


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    service_name: str
    socket_category: str  # a public category, or "private"
    bybit_topic: str
    routing_key: str
    queue_name: str
    event_class: str
    status: str


def load_live_rows() -> list[Row]:
    """Every pending or active subscription."""
    close_old_connections()
    rows = Subscription.objects.filter(status__in=Subscription.LIVE_STATUSES).values_list(
        "id", "service_name", "category", "bybit_topic", "routing_key", "queue_name", "event_class", "status"
    )
    return [Row(str(r[0]), r[1], r[2] or PRIVATE, *r[3:]) for r in rows]


def load_cancelled_bindings() -> set[tuple[str, str]]:
    """(queue, routing key) of rows cancelled recently, to unbind after a restart."""
    since = timezone.now() - CANCELLED_LOOKBACK
    rows = Subscription.objects.filter(status=Subscription.Status.CANCELLED, cancelled_at__gte=since)
    return set(rows.values_list("queue_name", "routing_key"))


def rows_filter(socket_category: str, topics: Iterable[str]) -> dict[str, object]:
    category = "" if socket_category == PRIVATE else socket_category
    return {"category": category, "bybit_topic__in": list(topics)}


def mark_active(socket_category: str, topics: list[str]) -> int:
    """Bybit confirmed these topics: their pending rows become active."""
    close_old_connections()
    return Subscription.objects.filter(
        status=Subscription.Status.PENDING, **rows_filter(socket_category, topics)
    ).update(status=Subscription.Status.ACTIVE, error="", updated_at=timezone.now())


def mark_failed(socket_category: str, topics: list[str] | None, message: str) -> int:
    """Bybit refused: live rows of these topics (all of the socket's when None) become failed."""
    close_old_connections()
    rows = Subscription.objects.filter(status__in=Subscription.LIVE_STATUSES)
    if topics is None:
        rows = rows.filter(category="" if socket_category == PRIVATE else socket_category)
    else:
        rows = rows.filter(**rows_filter(socket_category, topics))
    return rows.update(status=Subscription.Status.FAILED, error=message[:1000], updated_at=timezone.now())


def record_last_events(seen: dict[tuple[str, str], float]) -> None:
    """Write coarse `last_event_at` per topic (one UPDATE per topic, every few seconds at most)."""
    close_old_connections()
    for (socket_category, topic), ts in seen.items():
        at = datetime.fromtimestamp(ts, tz=UTC)
        Subscription.objects.filter(status=Subscription.Status.ACTIVE, **rows_filter(socket_category, [topic])).update(
            last_event_at=at
        )


def assign(wanted: dict[str, set[str]], current: dict[str, tuple[str, set[str]]]) -> dict[str, tuple[str, set[str]]]:
    """Place wanted topics on sockets: `{socket name: (category, topics)}`.

    `current` is the same shape for the sockets that exist. Topics stay where they are; new
    ones go to the first socket of their category with room, else to a new socket named
    `<category>-<n>`. Sockets left with no topics are absent from the result.
    """
    plan: dict[str, tuple[str, set[str]]] = {}
    placed: set[tuple[str, str]] = set()
    for name, (category, topics) in sorted(current.items()):
        keep = topics & wanted.get(category, set())
        plan[name] = (category, keep)
        placed.update((category, t) for t in keep)
    for category in sorted(wanted):
        for topic in sorted(wanted[category]):
            if (category, topic) in placed:
                continue
            target = next(
                (
                    n
                    for n, (c, ts) in sorted(plan.items())
                    if c == category and (category == PRIVATE or fits(ts, topic))
                ),
                None,
            )
            if target is None:
                index = 1
                while f"{category}-{index}" in plan:
                    index += 1
                target = f"{category}-{index}"
                plan[target] = (category, set())
            plan[target][1].add(topic)
    return {name: entry for name, entry in plan.items() if entry[1]}


class Bindings:
    """Declares service queues and their bindings on a connection of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: amqp.Connection | None = None
        self.channel: amqp.Channel | None = None
        self.bound: set[tuple[str, str]] = set()
        self.cleaned_after_start = False

    def ensure(self, rows: list[Row]) -> None:
        """Declare every live row's queue and binding; unbind what no live row needs any more."""
        needed = {(r.queue_name, r.routing_key): r.event_class for r in rows}
        try:
            channel = self.open()
            for (queue, key), event_class in needed.items():
                if (queue, key) in self.bound:
                    continue
                channel = self.declare(channel, queue, event_class)
                channel.queue_bind(queue, EXCHANGE, key)
                self.bound.add((queue, key))
                log.info("queue.bound", queue=queue, routing_key=key)
            stale = {b for b in self.bound if b not in needed}
            if not self.cleaned_after_start:
                stale |= {b for b in load_cancelled_bindings() if b not in needed}
                self.cleaned_after_start = True
            for queue, key in stale:
                channel.queue_unbind(queue, EXCHANGE, key)
                self.bound.discard((queue, key))
                log.info("queue.unbound", queue=queue, routing_key=key)
        except (OSError, amqp.exceptions.AMQPError) as exc:
            # A missing queue (deleted by an operator) or a lost broker: start over next time.
            log.warning("queue.declare_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            self.close()
            raise

    def declare(self, channel: amqp.Channel, queue: str, event_class: str) -> amqp.Channel:
        """Declare a service queue; one that exists with other arguments is used as it is.

        Changing a QUEUE_MAX_LENGTH_* setting does not change queues that already exist
        (RabbitMQ refuses a redeclare with other arguments): we keep delivering to them and say
        so, rather than stop every subscription. Delete the queue to apply the new limit.
        """
        arguments = queue_arguments(event_class)
        try:
            channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
            return channel
        except amqp.exceptions.PreconditionFailed as exc:
            log.warning("queue.arguments_differ", queue=queue, wanted=arguments, error=str(exc)[:300])
            self.channel = channel = self.conn.channel()  # type: ignore[union-attr] - the error closed the channel
            channel.queue_declare(queue, passive=True)
            return channel

    def open(self) -> amqp.Channel:
        if self.channel is None or self.conn is None or not self.conn.connected:
            self.conn = connect(self.url, name="ws-gateway declarations")
            self.channel = self.conn.channel()
            self.channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
            self.bound.clear()
        return self.channel

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except (OSError, amqp.exceptions.AMQPError):
                pass
        self.conn = self.channel = None
