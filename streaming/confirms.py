"""Publisher confirms as data: the frames RabbitMQ sends back, and which events await a confirm or a retry.

No sockets, no event loop, no clock: the publisher's connection shell (publisher.py) feeds bytes
in, passes the time, and acts on what comes back.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from streaming.envelope import Event

NACK_RETRY_DELAY = 1.0  # seconds before a nacked private event is published again
METHOD_FRAME = 1
FRAME_END = 0xCE
FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload length
METHOD_ID = struct.Struct(">HH")  # class id, method id
CONFIRM = struct.Struct(">QB")  # delivery tag, bits (multiple is bit 0)
CLOSE = struct.Struct(">HB")  # reply code, reply text length


@dataclass(frozen=True, slots=True)
class AmqpFrame:
    """One complete AMQP frame: its type (1 method, 2 header, 3 body, 8 heartbeat), channel and payload."""

    kind: int
    channel: int
    payload: bytes


class FrameReader:
    """Cuts the inbound byte stream into frames, whatever the boundaries of the reads."""

    def __init__(self) -> None:
        self.buffer = b""  # the start of a frame whose end has not arrived yet
        self.malformed = False

    def feed(self, data: bytes) -> list[AmqpFrame]:
        """Return the frames `data` completes, in order.

        A frame not ending in 0xCE means the stream is out of step: the frames before it are
        still returned, `malformed` becomes True and nothing is read from then on.
        """
        if self.malformed:
            return []
        buffer = self.buffer + data
        frames = []
        pos, size = 0, len(buffer)
        while size - pos >= 8:
            kind, channel, length = FRAME_HEADER.unpack_from(buffer, pos)
            end = pos + 7 + length
            if end >= size:
                break
            if buffer[end] != FRAME_END:
                self.malformed = True
                self.buffer = b""
                return frames
            frames.append(AmqpFrame(kind, channel, buffer[pos + 7 : end]))
            pos = end + 1
        self.buffer = buffer[pos:]
        return frames


@dataclass(frozen=True, slots=True)
class Ack:
    """basic.ack: RabbitMQ has the event(s) up to `delivery_tag` (or only it, unless `multiple`)."""

    delivery_tag: int
    multiple: bool


@dataclass(frozen=True, slots=True)
class Nack:
    """basic.nack: RabbitMQ refused the event(s), e.g. a reject-publish queue is full."""

    delivery_tag: int
    multiple: bool


@dataclass(frozen=True, slots=True)
class Blocked:
    """connection.blocked: RabbitMQ is short of resources and will not read our publishes."""


@dataclass(frozen=True, slots=True)
class Unblocked:
    """connection.unblocked: publishing may go on."""


@dataclass(frozen=True, slots=True)
class Close:
    """connection.close or channel.close: RabbitMQ ends the connection, with its reason."""

    code: int
    text: str


Method = Ack | Nack | Blocked | Unblocked | Close


def decode_method(payload: bytes) -> Method | None:
    """The method in a method frame's payload, or None for one the publisher does not act on."""
    class_id, method_id = METHOD_ID.unpack_from(payload)
    if class_id == 60 and method_id in (80, 120):  # basic.ack, basic.nack
        tag, bits = CONFIRM.unpack_from(payload, 4)
        return Ack(tag, bool(bits & 1)) if method_id == 80 else Nack(tag, bool(bits & 1))
    if class_id == 10 and method_id == 60:
        return Blocked()
    if class_id == 10 and method_id == 61:
        return Unblocked()
    if (class_id, method_id) in ((10, 50), (20, 40)):
        code, length = CLOSE.unpack_from(payload, 4)
        return Close(code, payload[7 : 7 + length].decode(errors="replace"))
    return None


class Confirms:
    """Which events RabbitMQ has yet to confirm, and which must be published again.

    Delivery tags count publishes on one channel from 1, so a new connection starts them over.
    Events wait here in three places: `unconfirmed` (published, tag -> event in publish order),
    `retry` (to publish again before anything new) and `parked` (nacked private events, each
    with the time it may go out again).
    """

    def __init__(self, retry_delay: float = NACK_RETRY_DELAY) -> None:
        self.retry_delay = retry_delay
        self.unconfirmed: dict[int, Event] = {}
        self.retry: deque[Event] = deque()
        self.parked: deque[tuple[float, Event]] = deque()
        self.next_tag = 1
        self.published = 0
        self.confirmed = 0
        self.republished = 0
        self.nacks = 0
        self.market_nack_drops = 0

    @property
    def in_flight(self) -> int:
        return len(self.unconfirmed) + len(self.retry) + len(self.parked)

    def take_due(self, now: float) -> list[Event]:
        """Move parked events whose time has come to the back of `retry`; return them."""
        due = []
        while self.parked and self.parked[0][0] <= now:
            due.append(self.parked.popleft()[1])
        self.retry.extend(due)
        return due

    def take_retries(self, limit: int) -> list[Event]:
        """Up to `limit` events to publish again, oldest first; they count as republished."""
        retry = self.retry
        taken = [retry.popleft() for _ in range(min(limit, len(retry)))]
        self.republished += len(taken)
        return taken

    def sent(self, events: Sequence[Event]) -> range:
        """Record `events` as published in this order; return their delivery tags."""
        tags = range(self.next_tag, self.next_tag + len(events))
        self.unconfirmed.update(zip(tags, events, strict=True))
        self.next_tag = tags.stop
        self.published += len(events)
        return tags

    def ack(self, delivery_tag: int, multiple: bool) -> int:
        """Forget the confirmed events; return how many (tags we do not hold are ignored)."""
        tags = self.settled(delivery_tag, multiple)
        for tag in tags:
            del self.unconfirmed[tag]
        self.confirmed += len(tags)
        return len(tags)

    def nack(self, delivery_tag: int, multiple: bool, now: float) -> list[Event]:
        """Take the refused events back: private ones are parked for a retry, market ones dropped.

        Returns every refused event, in publish order. Market data is not held back, as the
        hand-off does not hold it when full either: it is counted in `market_nack_drops`.
        """
        retry_at = now + self.retry_delay
        refused = [self.unconfirmed.pop(tag) for tag in self.settled(delivery_tag, multiple)]
        for event in refused:
            if event.private:
                self.parked.append((retry_at, event))
            else:
                self.market_nack_drops += 1
        self.nacks += len(refused)
        return refused

    def settled(self, delivery_tag: int, multiple: bool) -> list[int]:
        """The unconfirmed tags an ack or nack covers, in publish order."""
        if not multiple:
            return [delivery_tag] if delivery_tag in self.unconfirmed else []
        tags = []
        for tag in self.unconfirmed:  # insertion order is tag order
            if tag > delivery_tag:
                break
            tags.append(tag)
        return tags

    def requeue_all(self) -> list[Event]:
        """The connection is gone: every unconfirmed event goes to the front of `retry`, oldest first.

        Returns them. Tags start over at 1, as they will on the next connection's channel.
        """
        pending = list(self.unconfirmed.values())
        self.unconfirmed.clear()
        self.retry.extendleft(reversed(pending))
        self.next_tag = 1
        return pending
