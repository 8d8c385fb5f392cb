"""Consumers behind count as the gateway being behind: the depth of the services' market queues."""

from __future__ import annotations

import amqp

from streaming.publisher import connect
from streaming.reconciler import Bindings


def put(ch: amqp.Channel, queue: str, messages: int) -> None:
    ch.queue_declare(queue, durable=True, auto_delete=False)
    for n in range(messages):
        ch.basic_publish(amqp.Message(str(n)), exchange="", routing_key=queue)


def test_the_deepest_queue_with_a_consumer_is_found_and_one_nobody_reads_is_left_out(rabbit: str) -> None:
    conn = connect(rabbit, name="test backlog")
    ch = conn.channel()
    put(ch, "ws-gateway.slow.orderbook", 30)
    put(ch, "ws-gateway.fast.orderbook", 3)
    put(ch, "ws-gateway.gone.orderbook", 100)  # its service stopped: no consumer
    reader, handed_out = conn.channel(), []
    reader.basic_qos(0, 1, False)  # one message handed out to each, never acked: the rest stay ready
    for queue in ("ws-gateway.slow.orderbook", "ws-gateway.fast.orderbook"):
        reader.basic_consume(queue, callback=handed_out.append)
    while len(handed_out) < 2:
        conn.drain_events(timeout=5)
    bindings = Bindings(rabbit)
    try:
        queues = ["ws-gateway.fast.orderbook", "ws-gateway.missing.orderbook", "ws-gateway.gone.orderbook",
                  "ws-gateway.slow.orderbook"]  # fmt: skip
        assert bindings.deepest(queues) == (29, "ws-gateway.slow.orderbook")
        assert bindings.deepest(queues) == (29, "ws-gateway.slow.orderbook")  # the missing one did no harm
    finally:
        bindings.close()
        conn.close()
