"""RabbitMQ's frames are read whatever the reads' boundaries; confirms settle, park, drop and requeue events."""

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
    Unblocked,
    decode_method,
)
from streaming.envelope import Event

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


def test_nacked_private_event_is_parked_until_its_retry_time() -> None:
    """A refused private event is kept, and offered again only once the retry delay has passed."""
    confirms = Confirms(retry_delay=1.0)
    (order,) = publish(confirms, 1, private=True)
    assert confirms.nack(1, multiple=False, now=100.0) == [order]
    assert (confirms.nacks, confirms.market_nack_drops, confirms.in_flight) == (1, 0, 1)
    assert confirms.take_due(100.9) == []
    assert confirms.take_retries(10) == []
    assert confirms.take_due(101.0) == [order]
    assert confirms.take_retries(10) == [order]
    assert (confirms.republished, confirms.in_flight) == (1, 0)


def test_nacked_market_event_is_dropped_and_counted() -> None:
    """Refused market data is not kept: it is counted, and never offered again."""
    confirms = Confirms()
    trade, order = publish(confirms, 1)[0], publish(confirms, 1, private=True, first=1)[0]
    assert confirms.nack(2, multiple=True, now=0.0) == [trade, order]
    assert (confirms.nacks, confirms.market_nack_drops) == (2, 1)
    assert confirms.take_due(10.0) == [order]
    assert confirms.in_flight == 1


def test_requeue_all_puts_unconfirmed_first_oldest_first_and_restarts_tags() -> None:
    """On a lost connection every unconfirmed event is retried before earlier retries, in publish order."""
    confirms = Confirms()
    (order,) = publish(confirms, 1, private=True)
    confirms.nack(1, multiple=False, now=0.0)
    confirms.take_due(5.0)  # `order` now waits in the retry queue
    events = publish(confirms, 4, first=1)
    confirms.ack(3, multiple=False)
    pending = [events[0], events[2], events[3]]  # tags 2, 4, 5
    assert confirms.requeue_all() == pending
    assert confirms.unconfirmed == {}
    assert confirms.in_flight == 4
    assert confirms.take_retries(3) == pending
    assert confirms.take_retries(3) == [order]
    assert confirms.republished == 4
    assert confirms.sent([event(9)]) == range(1, 2)
