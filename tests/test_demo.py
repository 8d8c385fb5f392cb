"""`make demo`'s consumer empties the demo's queues as a service would, and a new demo starts from empty queues."""

from __future__ import annotations

import re
from io import StringIO

import amqp
import orjson
import pytest
from django.core.management import call_command

from streaming.management.commands.demo import purge_queues
from streaming.publisher import connect
from streaming.reconciler import queue_arguments
from subscriptions.services import subscription_create


def publish(url: str, queue: str, event_class: str, count: int) -> None:
    conn = connect(url)
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False, arguments=queue_arguments(event_class))
    for n in range(count):
        body = orjson.dumps({"id": f"{event_class}-{n}", "class": event_class, "received_ts": n, "data": {"n": n}})
        channel.basic_publish(amqp.Message(body), exchange="", routing_key=queue)
    conn.close()


def depth(url: str, queue: str) -> int:
    conn = connect(url)
    try:
        return conn.channel().queue_declare(queue, passive=True).message_count
    finally:
        conn.close()


@pytest.mark.django_db(transaction=True)
def test_consumer_prints_the_shown_classes_and_acks_every_event(rabbit: str) -> None:
    subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    subscription_create(service_name="alpha", channel="order")
    publish(rabbit, "ws-gateway.alpha.trade", "trade", 3)
    publish(rabbit, "ws-gateway.alpha.order", "order", 1)
    out = StringIO()
    call_command("consume_events", service="alpha", show=["trade", "order"], count=4, stdout=out, stderr=StringIO())
    assert sorted(re.findall(r" id=(\S+) ", out.getvalue())) == ["order-0", "trade-0", "trade-1", "trade-2"]
    assert depth(rabbit, "ws-gateway.alpha.trade") == depth(rabbit, "ws-gateway.alpha.order") == 0


def test_a_new_demo_starts_from_empty_queues(rabbit: str) -> None:
    publish(rabbit, "ws-gateway.demo.orderbook", "orderbook", 5)
    publish(rabbit, "ws-gateway.demo.order.overflow", "order", 2)
    publish(rabbit, "ws-gateway.other.orderbook", "orderbook", 1)
    assert purge_queues(rabbit, "demo") == 7
    assert depth(rabbit, "ws-gateway.demo.orderbook") == depth(rabbit, "ws-gateway.demo.order.overflow") == 0
    assert depth(rabbit, "ws-gateway.other.orderbook") == 1, "another service's queue is left alone"
