"""Print a service's events as they arrive, without taking them from the service's queues."""

from __future__ import annotations

from typing import Any

import amqp
import orjson
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from streaming.publisher import connect
from subscriptions.models import Subscription
from subscriptions.topics import CHANNEL_NAMES, EVENT_CLASSES, EXCHANGE, PRIVATE_CLASSES, channel_named

PREVIEW_CHARS = 160


class Command(BaseCommand):
    help = (
        "Print a service's events as they arrive. A temporary queue gets the same bindings as the "
        "service's live subscriptions, so the service's own queues lose nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--service", required=True, help="service name whose subscriptions to follow")
        parser.add_argument(
            "--class",
            dest="event_class",
            choices=sorted({*EVENT_CLASSES, *CHANNEL_NAMES}),
            type=lambda name: channel_named(name).event_class if name in CHANNEL_NAMES else name,
            help="only this event class (or channel: trades is trade)",
        )
        parser.add_argument("--count", type=int, default=0, help="stop after this many events (0: run until Ctrl-C)")
        parser.add_argument("--timeout", type=float, default=0, help="stop after this many idle seconds (0: never)")
        parser.add_argument("--json", action="store_true", help="print whole envelopes as JSON lines")

    def handle(self, *args: Any, **options: Any) -> None:
        rows = Subscription.objects.filter(service_name=options["service"], status__in=Subscription.LIVE_STATUSES)
        if options["event_class"]:
            rows = rows.filter(event_class=options["event_class"])
        # Private events go to each service queue by name, not through the exchange: nothing to tap.
        private = rows.filter(event_class__in=PRIVATE_CLASSES).exists()
        keys = sorted(set(rows.exclude(event_class__in=PRIVATE_CLASSES).values_list("routing_key", flat=True)))
        if private:
            self.stderr.write("private classes are delivered to the service's queues by name and cannot be followed")
        if not keys:
            raise CommandError(f"service {options['service']!r} has no live market subscriptions to follow")
        conn = connect(settings.RABBITMQ_URL, name="ws-gateway tail_events")
        channel = conn.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
        queue = channel.queue_declare("", exclusive=True, auto_delete=True, arguments={"x-max-length": 10_000}).queue
        for key in keys:
            channel.queue_bind(queue, EXCHANGE, key)
        self.stderr.write(f"following {len(keys)} routing key(s) of {options['service']}: {', '.join(keys)}")
        self.seen = 0
        channel.basic_consume(queue, callback=lambda m: self.show(m, options["json"]), no_ack=True)
        try:
            while not options["count"] or self.seen < options["count"]:
                try:
                    conn.drain_events(timeout=options["timeout"] or None)
                except TimeoutError:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            conn.close()

    def show(self, message: amqp.Message, as_json: bool) -> None:
        self.seen += 1
        if as_json:
            self.stdout.write(message.body.decode() if isinstance(message.body, bytes) else message.body)
            return
        self.stdout.write(describe(message))


def describe(message: amqp.Message) -> str:
    """One line per event: when, routing key, type, sequence fields, id and the start of its data."""
    event = orjson.loads(message.body)
    data = orjson.dumps(event.get("data")).decode()
    preview = data if len(data) <= PREVIEW_CHARS else data[:PREVIEW_CHARS] + "..."
    return (
        f"{event.get('received_ts')} {message.delivery_info['routing_key']} {event.get('type')} "
        f"u={event.get('u')} seq={event.get('seq')} id={event.get('id')} {preview}"
    )
