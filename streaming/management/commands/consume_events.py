"""`manage.py consume_events`: a minimal consumer of a service's own queues, as `make demo` runs it."""

from __future__ import annotations

from typing import Any

import amqp
import orjson
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections

from streaming.management.commands.tail_events import describe
from streaming.publisher import connect
from streaming.reconciler import queue_arguments
from subscriptions.models import Subscription
from subscriptions.topics import CHANNEL_NAMES, EVENT_CLASSES, channel_named

# Seconds between looks for queues of new subscriptions.
REFRESH_INTERVAL = 2.0
PREFETCH = 500


class Command(BaseCommand):
    help = (
        "Consume a service's queues as the service itself would: take and ack every event (private "
        "classes too), print those of the --show classes. Queues of new subscriptions are picked up "
        "within seconds. Unlike tail_events, this empties the queues."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--service", required=True, help="service name whose queues to consume")
        parser.add_argument(
            "--show",
            action="append",
            choices=sorted({*EVENT_CLASSES, *CHANNEL_NAMES}),
            type=lambda name: channel_named(name).event_class if name in CHANNEL_NAMES else name,
            help="print events of this class (repeat for more; default: every class)",
        )
        parser.add_argument("--count", type=int, default=0, help="stop after printing this many (0: until Ctrl-C)")

    def handle(self, *args: Any, **options: Any) -> None:
        self.service: str = options["service"]
        self.shown_classes: set[str] = set(options["show"] or EVENT_CLASSES)
        self.count: int = options["count"]
        self.shown = 0
        self.consumed: set[str] = set()
        self.conn = connect(settings.RABBITMQ_URL, name=f"ws-gateway consume_events {self.service}")
        try:
            while not self.count or self.shown < self.count:
                self.consume_new_queues()
                try:
                    self.conn.drain_events(timeout=REFRESH_INTERVAL)
                except TimeoutError:
                    pass
        except KeyboardInterrupt:
            pass
        finally:
            self.conn.close()

    def consume_new_queues(self) -> None:
        """Start consuming every queue of the service's live subscriptions not consumed yet."""
        close_old_connections()
        rows = Subscription.objects.filter(service_name=self.service, status__in=Subscription.LIVE_STATUSES)
        for queue, event_class in set(rows.values_list("queue_name", "event_class")):
            if queue in self.consumed:
                continue
            channel = self.conn.channel()
            try:
                # As the gateway declares it, so whichever of the two comes first makes the same queue.
                channel.queue_declare(queue, durable=True, auto_delete=False, arguments=queue_arguments(event_class))
            except amqp.exceptions.PreconditionFailed:
                channel = self.conn.channel()  # made with other limits before: use it as it is
                channel.queue_declare(queue, passive=True)
            channel.basic_qos(0, PREFETCH, False)
            channel.basic_consume(queue, callback=self.on_message)
            self.consumed.add(queue)
            self.stderr.write(f"consuming {queue}")

    def on_message(self, message: amqp.Message) -> None:
        # Print first, ack after: a consumer that dies in between gets the event again (at least once).
        if orjson.loads(message.body).get("class") in self.shown_classes and (
            not self.count or self.shown < self.count
        ):
            self.stdout.write(describe(message))
            self.shown += 1
        message.channel.basic_ack(message.delivery_tag)
