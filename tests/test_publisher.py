"""The publisher delivers every event to RabbitMQ with confirms, through drops and outages."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import amqp
import orjson
import pytest
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from streaming.envelope import Event
from streaming.publisher import Handoff, Publisher, connect, encode_publish, shortstr
from subscriptions.topics import EXCHANGE
from tests.conftest import close_publisher_connections, wait_for


def make_event(
    n: int, private: bool = False, size: int = 0, routing_key: str = "trade.linear.BTCUSDT", epoch: int = 0
) -> Event:
    body = orjson.dumps({"id": f"run-{n}-0", "n": n, "pad": "x" * size})
    return Event(
        f"run-{n}-0", f"run-{n}", "order" if private else "trade", routing_key, body, private, "t", 1_700_000_000_123,
        epoch,
    )  # fmt: skip


@pytest.fixture
def channel(rabbit: str) -> Iterator[amqp.Channel]:
    conn = connect(rabbit)
    ch = conn.channel()
    ch.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
    ch.declared = []  # type: ignore[attr-defined]
    yield ch
    for name in ch.declared:  # type: ignore[attr-defined]
        ch.queue_delete(name)
    conn.close()


def declare(ch: amqp.Channel, name: str, key: str = "#", **arguments: object) -> None:
    ch.queue_declare(name, durable=True, auto_delete=False, arguments=arguments or None)
    ch.declared.append(name)  # type: ignore[attr-defined]
    ch.queue_purge(name)
    ch.queue_bind(name, EXCHANGE, key)


def read_all(ch: amqp.Channel, queue: str, expected: int, timeout: float = 10) -> list[amqp.Message]:
    """Consume until `expected` messages arrived (or fail after `timeout`)."""
    got: list[amqp.Message] = []
    ch.basic_qos(0, 1000, False)
    tag = ch.basic_consume(queue, callback=got.append, no_ack=True)

    def more() -> bool:
        try:
            while len(got) < expected:
                ch.connection.drain_events(timeout=0.1)
        except TimeoutError:
            pass
        return len(got) >= expected

    wait_for(more, timeout, message=f"{expected} messages in {queue}")
    ch.basic_cancel(tag)
    return got


class RunningPublisher:
    """A Publisher on its own event loop in a thread, for these sync tests."""

    def __init__(self, url: str, handoff: Handoff, **kwargs: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.handoff = handoff
        self.publisher = Publisher(url, handoff, backoff_base=0.05, backoff_cap=0.2, **kwargs)  # type: ignore[arg-type]
        self.stopping = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self.publisher.run(self.stopping), self.loop)
        self.call(self.publisher.kick)

    def __getattr__(self, name: str) -> object:
        return getattr(self.publisher, name)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def put(self, event: Event) -> None:
        def put_and_kick() -> None:
            self.handoff.put(event)
            self.publisher.kick()

        self.call(put_and_kick)

    def stop(self, timeout: float) -> bool:
        """Flush everything, then stop; True if all was confirmed in time."""
        flushed = asyncio.run_coroutine_threadsafe(self.publisher.flush(timeout), self.loop).result(timeout + 5)
        self.call(self.stopping.set)
        self.call(self.publisher.close)
        try:
            self.task.result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        return flushed


def run_publisher(url: str, handoff: Handoff, **kwargs: object) -> RunningPublisher:
    return RunningPublisher(url, handoff, **kwargs)


def test_consumer_reads_the_envelope_and_properties(rabbit: str, channel: amqp.Channel) -> None:
    """Body, message id, content type, persistence, timestamp and headers arrive as sent."""
    declare(channel, "t.props")
    handoff = Handoff(100)
    handoff.put(make_event(1))
    handoff.put(make_event(2, private=True, routing_key="order.linear.BTCUSDT", epoch=2**40 + 7))
    publisher = run_publisher(rabbit, handoff)
    assert publisher.stop(10)
    messages = sorted(read_all(channel, "t.props", 2), key=lambda m: m.properties["message_id"])
    assert [orjson.loads(m.body)["n"] for m in messages] == [1, 2]
    market, private = messages
    assert market.properties["content_type"] == "application/json"
    assert market.properties["delivery_mode"] == 1
    assert private.properties["delivery_mode"] == 2
    assert market.properties["message_id"] == "run-1-0"
    assert market.properties["timestamp"] == 1_700_000_000
    assert market.properties["application_headers"] == {"trace_id": "run-1", "class": "trade", "epoch": 0}
    assert private.properties["application_headers"] == {"trace_id": "run-2", "class": "order", "epoch": 2**40 + 7}
    assert private.delivery_info["routing_key"] == "order.linear.BTCUSDT"
    assert publisher.confirmed == 2


def test_body_larger_than_a_frame_arrives_whole(rabbit: str, channel: amqp.Channel) -> None:
    """A 1 MB envelope is split across AMQP body frames and reassembled."""
    declare(channel, "t.large")
    handoff = Handoff(10)
    handoff.put(make_event(1, size=1_000_000))
    publisher = run_publisher(rabbit, handoff)
    assert publisher.stop(10)
    (message,) = read_all(channel, "t.large", 1)
    assert len(orjson.loads(message.body)["pad"]) == 1_000_000


def test_market_events_wait_out_the_write_gap_and_a_private_one_does_not() -> None:
    async def kicks() -> tuple[bool, bool, bool]:
        handoff = Handoff(100)
        publisher = Publisher("amqp://guest:guest@127.0.0.1:5672/", handoff)
        publisher.passes.written_at = asyncio.get_running_loop().time()  # it has just written
        handoff.put(make_event(1))
        publisher.kick()
        market_waits = publisher.passes.delayed is not None
        handoff.put(make_event(2, private=True))
        publisher.kick()
        await asyncio.sleep(0)  # one loop turn: the pass has run, not WRITE_GAP later
        return market_waits, publisher.passes.delayed is None, publisher.passes.scheduled

    assert asyncio.run(kicks()) == (True, True, False)


def test_full_handoff_drops_oldest_market_data_and_keeps_private() -> None:
    """Market events beyond the limit push out the oldest; private events are never dropped."""
    handoff = Handoff(3)
    for n in range(5):
        handoff.put(make_event(n))
    for n in range(100, 110):
        handoff.put(make_event(n, private=True))
    assert handoff.dropped == 2
    taken = []
    while (event := handoff.take()) is not None:
        taken.append(orjson.loads(event.body)["n"])
    assert taken == [*range(100, 110), 2, 3, 4]


def test_full_private_queue_is_retried_not_dropped(rabbit: str, channel: amqp.Channel) -> None:
    """RabbitMQ refuses publishes to a full reject-publish queue; the publisher keeps them."""
    declare(channel, "t.reject", **{"x-max-length": 5, "x-overflow": "reject-publish"})
    handoff = Handoff(10)
    for n in range(12):
        handoff.put(make_event(n, private=True))
    publisher = run_publisher(rabbit, handoff)
    wait_for(lambda: publisher.nacks >= 7, message="nacks from the full queue")
    got = read_all(channel, "t.reject", 12, timeout=20)  # draining makes room for the retries
    assert publisher.stop(10)
    assert {orjson.loads(m.body)["n"] for m in got} == set(range(12))


def test_forced_connection_close_loses_nothing(rabbit: str, channel: amqp.Channel) -> None:
    """Closing the publisher's connection mid-stream: every event arrives, duplicates allowed."""
    declare(channel, "t.outage", **{"x-max-length": 1_000_000})
    handoff = Handoff(1_000_000)
    publisher = run_publisher(rabbit, handoff, window=500)
    fed = 0

    def feed_and_close() -> bool:
        """A burst, then a close while it is in flight; again until a close caught unconfirmed events."""
        nonlocal fed
        for _ in range(3000):
            publisher.put(make_event(fed))
            fed += 1
        if publisher.republished == 0:
            close_publisher_connections(rabbit)
        return publisher.republished > 0 and publisher.connected

    wait_for(feed_and_close, timeout=30, interval=0.2, message="a close with events in flight, and a reconnect")
    for _ in range(2000):
        publisher.put(make_event(fed))
        fed += 1
    assert publisher.stop(30)
    got = read_all(channel, "t.outage", fed, timeout=30)
    assert {orjson.loads(m.body)["n"] for m in got} == set(range(fed))
    assert publisher.republished > 0


def pamqp_publish(channel_id: int, event: Event, frame_max: int, queue: str = "") -> bytes:
    """The same publish as pamqp, a maintained AMQP library, marshals it."""
    headers = {"trace_id": event.trace_id, "class": event.event_class, "epoch": event.epoch}
    if queue:  # a private copy to one queue by name, through the default exchange, mandatory
        method = commands.Basic.Publish(exchange="", routing_key=queue, mandatory=True)
        headers["routing_key"] = event.routing_key
    else:
        method = commands.Basic.Publish(exchange=EXCHANGE, routing_key=event.routing_key)
    properties = commands.Basic.Properties(
        content_type="application/json",
        headers=headers,
        delivery_mode=2 if event.private else 1,
        message_id=event.id,
        timestamp=datetime.fromtimestamp(event.received_ts // 1000, UTC),
    )
    frames = [marshal(method, channel_id), marshal(ContentHeader(0, len(event.body), properties), channel_id)]
    chunk = frame_max - 8
    frames += [marshal(ContentBody(event.body[i : i + chunk]), channel_id) for i in range(0, len(event.body), chunk)]
    return b"".join(frames)


@pytest.mark.parametrize(
    "event",
    [
        make_event(1),
        make_event(2, private=True, routing_key="order.linear.BTCUSDT"),
        make_event(3, size=300_000),  # three body frames
        make_event(4, routing_key="k" * 255),  # the longest short string
        make_event(5, epoch=300),
        make_event(6, epoch=70_000),
        make_event(7, epoch=2**40 + 7),
    ],
    ids=["market", "private", "large", "long-key", "epoch-short", "epoch-int", "epoch-long"],
)
def test_encode_publish_is_byte_for_byte_what_pamqp_marshals(event: Event) -> None:
    """The hand-packed Basic.Publish, content header and body frames equal pamqp's."""
    assert encode_publish(3, shortstr(EXCHANGE), event, 131072) == pamqp_publish(3, event, 131072)


def test_a_private_copy_to_one_queue_is_byte_for_byte_what_pamqp_marshals() -> None:
    """Default exchange, the queue's name as routing key, mandatory, the event's key in a header."""
    event = make_event(8, private=True, routing_key="order.linear.BTCUSDT", epoch=3)
    queue = "ws-gateway.alpha.order"
    packed = encode_publish(3, shortstr(""), event, 131072, queue, b"\x01")
    assert packed == pamqp_publish(3, event, 131072, queue)


def test_an_unencodable_event_is_set_aside_and_its_batch_goes_out(rabbit: str, channel: amqp.Channel) -> None:
    """A 300-character routing key cannot be an AMQP short string: only that event is kept back.

    Every other event of the batch is published and confirmed, and the delivery tags stay in
    step with RabbitMQ's (the next batch is confirmed exactly too).
    """
    declare(channel, "t.unencodable")
    handoff = Handoff(100)
    for n in range(10):
        handoff.put(make_event(n, private=True, routing_key="x" * 300 if n == 4 else "order.linear.BTCUSDT"))
    publisher = run_publisher(rabbit, handoff)
    wait_for(lambda: publisher.confirmed == 9 and not publisher.in_flight, message="the nine good events confirmed")
    for n in range(10, 20):
        publisher.put(make_event(n, private=True, routing_key="order.linear.BTCUSDT"))
    assert publisher.stop(10)
    got = read_all(channel, "t.unencodable", 19)
    assert sorted(orjson.loads(m.body)["n"] for m in got) == [n for n in range(20) if n != 4]
    assert (publisher.published, publisher.confirmed, publisher.unencodable) == (19, 19, 1)
