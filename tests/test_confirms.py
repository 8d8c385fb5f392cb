"""RabbitMQ's frames are read whatever the reads' boundaries; confirms settle, drop and requeue events; private
events wait per queue, in order, when that queue refuses or is gone."""

from __future__ import annotations

import struct

from streaming.confirms import (
    Ack,
    AmqpFrame,
    Blocked,
    Close,
    Confirms,
    FrameReader,
    Nack,
    Return,
    Routes,
    Unblocked,
    decode_method,
    message_id,
    topic_matches,
)
from streaming.envelope import Event
from streaming.publisher import encode_publish

# Frames are packed with struct here (pamqp is not installed), following the AMQP 0-9-1 grammar.


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def method(channel: int, class_id: int, method_id: int, arguments: bytes = b"") -> bytes:
    return frame(1, channel, struct.pack(">HH", class_id, method_id) + arguments)


def shortstr(text: str) -> bytes:
    return bytes((len(text),)) + text.encode()


ACK_UP_TO_3 = method(1, 60, 80, struct.pack(">QB", 3, 1))
HEARTBEAT = frame(8, 0, b"")
BLOCKED = method(0, 10, 60, shortstr("low on memory"))
NACK_5 = method(1, 60, 120, struct.pack(">QB", 5, 0b10))  # requeue bit set, multiple not
UNBLOCKED = method(0, 10, 61)
CHANNEL_CLOSE = method(1, 20, 40, struct.pack(">H", 404) + shortstr("NOT_FOUND - no exchange") + b"\x00\x28\x00\x28")
STREAM = ACK_UP_TO_3 + HEARTBEAT + BLOCKED + NACK_5 + UNBLOCKED + CHANNEL_CLOSE
SHORT_STREAM = ACK_UP_TO_3 + HEARTBEAT + NACK_5


def read(chunks: list[bytes]) -> list[AmqpFrame]:
    reader = FrameReader()
    frames = [frame for chunk in chunks for frame in reader.feed(chunk)]
    assert not reader.malformed
    assert reader.buffer == b""
    return frames


def methods(frames: list[AmqpFrame]) -> list[object]:
    return [decode_method(frame.payload) for frame in frames if frame.kind == 1]


def test_stream_in_one_read_yields_every_frame_and_method() -> None:
    """Each frame comes out once, in order, with its type and channel; the methods decode to what was sent."""
    frames = read([STREAM])
    assert [(frame.kind, frame.channel) for frame in frames] == [(1, 1), (8, 0), (1, 0), (1, 1), (1, 0), (1, 1)]
    assert methods(frames) == [
        Ack(3, True),
        Blocked(),
        Nack(5, False),
        Unblocked(),
        Close(404, "NOT_FOUND - no exchange"),
    ]


def test_every_split_point_yields_the_same_frames() -> None:
    """A read may end anywhere, inside the header, payload or frame end: the frames are the same."""
    whole = read([STREAM])
    for cut in range(len(STREAM) + 1):
        assert read([STREAM[:cut], STREAM[cut:]]) == whole, cut


def test_every_pair_of_split_points_yields_the_same_frames() -> None:
    """Three reads, cut at any two points of a short stream, still give its frames in order."""
    whole = read([SHORT_STREAM])
    assert len(whole) == 3
    for first in range(len(SHORT_STREAM) + 1):
        for second in range(first, len(SHORT_STREAM) + 1):
            chunks = [SHORT_STREAM[:first], SHORT_STREAM[first:second], SHORT_STREAM[second:]]
            assert read(chunks) == whole, (first, second)


def test_byte_at_a_time_yields_the_same_frames() -> None:
    """One byte per read: the partial frame is kept across every call."""
    assert read([STREAM[i : i + 1] for i in range(len(STREAM))]) == read([STREAM])


def test_frame_without_its_end_byte_is_reported_and_reading_stops() -> None:
    """A frame not ending in 0xCE means the stream is out of step; frames before it still count."""
    broken = HEARTBEAT[:-1] + b"\x00"
    reader = FrameReader()
    frames = reader.feed(ACK_UP_TO_3 + broken + NACK_5)
    assert methods(frames) == [Ack(3, True)]
    assert reader.malformed
    assert reader.feed(NACK_5) == []


def test_frame_end_split_off_is_checked_when_it_arrives() -> None:
    """A bad end byte arriving alone in the next read is still caught."""
    reader = FrameReader()
    assert reader.feed(ACK_UP_TO_3[:-1]) == []
    assert not reader.malformed
    assert reader.feed(b"\x00") == []
    assert reader.malformed


def test_methods_the_publisher_does_not_act_on_decode_to_none() -> None:
    """channel.open-ok (20, 11) is read past, not mistaken for a confirm."""
    (opened,) = read([method(1, 20, 11, struct.pack(">I", 0))])
    assert decode_method(opened.payload) is None


def test_connection_close_carries_code_and_text() -> None:
    """connection.close names why RabbitMQ ends the connection."""
    payload = struct.pack(">HH", 10, 50) + struct.pack(">H", 320) + shortstr("CONNECTION_FORCED - shutdown") + bytes(4)
    assert decode_method(payload) == Close(320, "CONNECTION_FORCED - shutdown")


def event(n: int, private: bool = False) -> Event:
    kind = "order" if private else "trade"
    return Event(f"run-{n}-0", f"run-{n}", kind, f"{kind}.linear.BTCUSDT", b"{}", private, "t", 1_700_000_000_000)


def publish(confirms: Confirms, count: int, private: bool = False, first: int = 0) -> list[Event]:
    events = [event(first + n, private) for n in range(count)]
    confirms.sent(events)
    return events


def test_sent_events_get_consecutive_tags_from_one() -> None:
    """Tags count publishes on the channel from 1, across batches."""
    confirms = Confirms()
    assert confirms.sent([event(0), event(1)]) == range(1, 3)
    assert confirms.sent([event(2)]) == range(3, 4)
    assert list(confirms.unconfirmed) == [1, 2, 3]
    assert (confirms.published, confirms.in_flight) == (3, 3)


def test_multiple_ack_settles_every_tag_up_to_it() -> None:
    """An ack with `multiple` confirms that tag and every earlier one, and nothing after."""
    confirms = Confirms()
    events = publish(confirms, 6)
    assert confirms.ack(4, multiple=True) == 4
    assert list(confirms.unconfirmed.values()) == events[4:]
    assert (confirms.confirmed, confirms.in_flight) == (4, 2)


def test_single_ack_settles_only_its_tag() -> None:
    """Without `multiple`, earlier tags stay unconfirmed."""
    confirms = Confirms()
    events = publish(confirms, 3)
    assert confirms.ack(2, multiple=False) == 1
    assert list(confirms.unconfirmed.values()) == [events[0], events[2]]
    assert confirms.confirmed == 1


def test_acks_for_unknown_tags_are_ignored() -> None:
    """A tag already settled, or never sent, changes nothing."""
    confirms = Confirms()
    publish(confirms, 3)
    confirms.ack(1, multiple=False)
    assert confirms.ack(1, multiple=False) == 0
    assert confirms.ack(99, multiple=False) == 0
    assert confirms.nack(99, multiple=False, now=0.0) == []
    assert list(confirms.unconfirmed) == [2, 3]
    assert (confirms.confirmed, confirms.nacks) == (1, 0)


def test_nacked_market_event_is_dropped_and_counted() -> None:
    """Refused market data is not kept: it is counted, and never offered again."""
    confirms = Confirms()
    (trade,) = publish(confirms, 1)
    assert confirms.nack(1, multiple=True, now=0.0) == [trade]
    assert (confirms.nacks, confirms.market_nack_drops, confirms.in_flight) == (1, 1, 0)
    assert confirms.take_retries(10) == []


def test_requeue_all_puts_market_events_first_oldest_first_and_restarts_tags() -> None:
    """On a lost connection every unconfirmed market event is retried before anything new, in publish order."""
    confirms = Confirms()
    events = publish(confirms, 4)
    confirms.ack(2, multiple=False)
    pending = [events[0], events[2], events[3]]
    assert confirms.requeue_all() == pending
    assert confirms.unconfirmed == {}
    assert confirms.in_flight == 3
    assert confirms.take_retries(2) == pending[:2]
    assert confirms.take_retries(2) == pending[2:]
    assert confirms.republished == 3
    assert confirms.sent([event(9)]) == range(1, 2)


# Private events: one lane per destination queue.


def order(n: int) -> Event:
    return event(n, private=True)


def hold(confirms: Confirms, queues: list[str], events: list[Event]) -> None:
    for e in events:
        for queue in queues:
            confirms.hold(queue, e)


def take(confirms: Confirms, queue: str, now: float = 0.0, limit: int = 100) -> tuple[list[int], list[Event]]:
    """Publish what the lane of `queue` may send now; return the tags it got and the events."""
    first = confirms.next_tag
    events = confirms.take_lane(confirms.lanes[queue], limit, now)
    return list(range(first, confirms.next_tag)), events


def test_a_full_queue_holds_back_its_own_copies_only() -> None:
    """Bravo refuses; alpha's copies are settled and alpha keeps getting new events at once."""
    confirms = Confirms()
    orders = [order(n) for n in range(3)]
    hold(confirms, ["alpha", "bravo"], orders)
    alpha_tags, _ = take(confirms, "alpha")
    bravo_tags, _ = take(confirms, "bravo")
    confirms.ack(alpha_tags[-1], multiple=True)
    assert confirms.nack(bravo_tags[0], multiple=False, now=10.0) == [orders[0]]
    confirms.ack(bravo_tags[-1], multiple=True)  # bravo took 1 and 2: they were on the wire already
    assert confirms.reordered == 2
    assert confirms.parked() == {"bravo": 1}
    hold(confirms, ["alpha", "bravo"], [order(3)])
    assert take(confirms, "alpha", now=10.0)[1] == [order(3)]  # alpha is not held back
    assert take(confirms, "bravo", now=10.0)[1] == []  # bravo waits for its backoff
    assert confirms.parked() == {"bravo": 2}


def test_a_refusing_queue_gets_its_oldest_event_alone_after_a_backoff_then_the_rest_in_order() -> None:
    """Order per queue: after a refusal, one try at a time, the next only once the previous was accepted."""
    confirms = Confirms(retry_delay=1.0, retry_cap=4.0)
    orders = [order(n) for n in range(4)]
    hold(confirms, ["bravo"], orders)
    tags, _ = take(confirms, "bravo")
    confirms.nack(tags[-1], multiple=True, now=100.0)  # the queue is full: all four refused
    assert confirms.parked() == {"bravo": 4}
    assert confirms.next_retry_at() == 101.0
    assert take(confirms, "bravo", now=100.9)[1] == []
    tags, events = take(confirms, "bravo", now=101.0)
    assert events == [orders[0]]  # the oldest, alone
    assert take(confirms, "bravo", now=101.0)[1] == []  # nothing more while it is in flight
    confirms.nack(tags[0], multiple=False, now=101.0)
    assert confirms.next_retry_at() == 103.0  # refused again: the wait doubles
    tags, _ = take(confirms, "bravo", now=103.0)
    confirms.nack(tags[0], multiple=False, now=103.0)
    tags, _ = take(confirms, "bravo", now=107.0)
    confirms.nack(tags[0], multiple=False, now=107.0)
    assert confirms.next_retry_at() == 111.0  # capped at retry_cap
    received = []
    now = 111.0
    while confirms.parked() or confirms.lanes["bravo"].in_flight:
        tags, events = take(confirms, "bravo", now=now)
        assert len(events) == 1
        received += events
        confirms.ack(tags[0], multiple=False)  # accepted: the next goes at once, no backoff
    assert received == orders
    assert confirms.lanes["bravo"].careful is False
    hold(confirms, ["bravo"], [order(5), order(6)])
    assert take(confirms, "bravo", now=now)[1] == [order(5), order(6)]  # caught up: pipelined again
    assert (confirms.republished, confirms.reordered) == (7, 0)


def test_returned_publish_waits_in_its_lane_and_its_ack_confirms_nothing() -> None:
    """RabbitMQ returns, then acks, a publish to a deleted queue: the event is kept, not confirmed."""
    confirms = Confirms(retry_delay=0.5)
    orders = [order(0), order(1)]
    hold(confirms, ["alpha"], orders)
    tags, _ = take(confirms, "alpha")
    assert confirms.returned("alpha", orders[1].id, now=5.0) == orders[1]
    assert confirms.returned("alpha", "no-such-id", now=5.0) is None
    assert confirms.returned("nobody", orders[0].id, now=5.0) is None
    assert confirms.ack(tags[-1], multiple=True) == 1  # the returned one is not confirmed by its ack
    assert (confirms.confirmed, confirms.returns, confirms.in_flight) == (1, 1, 1)
    assert confirms.next_retry_at() == 5.5
    assert take(confirms, "alpha", now=5.5)[1] == [orders[1]]


def test_a_full_parked_set_spills_later_events_to_the_overflow_lane_until_it_caught_up() -> None:
    """Past `park_limit` refused events, new ones go to `<queue>.overflow`: bounded, and nothing dropped."""
    confirms = Confirms(park_limit=2)
    hold(confirms, ["bravo"], [order(0), order(1)])
    tags, _ = take(confirms, "bravo")
    confirms.nack(tags[-1], multiple=True, now=0.0)
    hold(confirms, ["bravo"], [order(2), order(3)])
    assert confirms.parked() == {"bravo": 2}
    assert confirms.lanes["bravo.overflow"].waiting[0][1] == order(2)
    assert (confirms.spilled, confirms.spilled_by_queue(), confirms.overflow_queues()) == (
        2,
        {"bravo": 2},
        ["bravo.overflow"],
    )
    assert confirms.in_flight == 4
    for _ in range(2):
        tags, _ = take(confirms, "bravo", now=60.0)
        confirms.ack(tags[0], multiple=False)
    hold(confirms, ["bravo"], [order(4)])
    assert take(confirms, "bravo", now=60.0)[1] == [order(4)]  # caught up: back to its own queue
    assert [e for _, e, _ in confirms.lanes["bravo.overflow"].waiting] == [order(2), order(3)]


def test_requeue_all_puts_private_events_back_in_their_lanes_in_order_without_a_backoff() -> None:
    """After a lost connection a lane resends what was in flight, oldest first, at once."""
    confirms = Confirms()
    orders = [order(n) for n in range(3)]
    hold(confirms, ["alpha"], orders)
    tags, _ = take(confirms, "alpha")
    publish(confirms, 2)  # market events in between
    confirms.ack(tags[0], multiple=False)
    assert len(confirms.requeue_all()) == 4
    assert confirms.parked() == {}  # nothing refused them
    assert take(confirms, "alpha", now=0.0) == ([1, 2], orders[1:])
    assert confirms.republished == 2


def test_routes_send_each_event_to_every_queue_whose_pattern_matches_once() -> None:
    """`#` is any number of words, `*` exactly one; a queue bound twice still gets one copy."""
    routes = Routes()
    assert routes.set([("q.all", "order.#"), ("q.linear", "order.linear.*"), ("q.all", "order.*.BTCUSDT")])
    assert routes.queues("order.linear.BTCUSDT") == ("q.all", "q.linear")
    assert routes.queues("order.spot.ETHUSDT") == ("q.all",)
    assert routes.queues("order") == ("q.all",)
    assert routes.queues("orders.linear.BTCUSDT") == ()
    assert routes.queues("execution.linear.BTCUSDT") == ()
    assert not routes.set([("q.linear", "order.linear.*"), ("q.all", "order.#"), ("q.all", "order.*.BTCUSDT")])
    assert routes.set([("q.linear", "order.linear.*")])
    assert routes.queues("order.spot.ETHUSDT") == ()


def test_topic_patterns_match_as_rabbitmq_does() -> None:
    cases = [
        ("#", "a.b", True),
        ("a.#", "a", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.b.c", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
    ]
    for pattern, key, expected in cases:
        assert topic_matches(pattern.split("."), key.split(".")) is expected, (pattern, key)


def returned_message(queue: str, published: Event) -> bytes:
    """What RabbitMQ sends for an unroutable mandatory publish: basic.return, then the message's own frames."""
    arguments = struct.pack(">H", 312) + shortstr("NO_ROUTE") + shortstr("") + shortstr(queue)
    content = encode_publish(1, b"\x00", published, 4096, queue, b"\x01")
    _, header_and_body = content.split(b"\xce", 1)  # drop our method frame: RabbitMQ sends its return instead
    return method(1, 60, 50, arguments) + header_and_body


def test_a_returned_message_names_its_queue_and_message_id_whatever_the_reads() -> None:
    """basic.return decodes; the content header after it carries the event id, found past the headers table."""
    published = order(7)
    stream = returned_message("ws-gateway.alpha.order", published) + ACK_UP_TO_3
    frames = read([stream])
    assert [f.kind for f in frames] == [1, 2, 3, 1]
    assert decode_method(frames[0].payload) == Return(312, "NO_ROUTE", "", "ws-gateway.alpha.order")
    assert message_id(frames[1].payload) == published.id
    assert decode_method(frames[3].payload) == Ack(3, True)
    for cut in range(len(stream) + 1):
        assert read([stream[:cut], stream[cut:]]) == frames, cut
