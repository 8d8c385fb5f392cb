"""Publisher confirms as data: the frames RabbitMQ sends back, and which events await a confirm or a retry.

No sockets, no event loop, no clock: the publisher's connection shell (publisher.py) feeds bytes
in, passes the time, and acts on what comes back. Private events travel in per-queue `Lane`s
(which queues an event goes to is `Routes`), so a queue that refuses holds back only its own
events, in order, while every other queue gets them at once.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from streaming.envelope import Event

PARK_RETRY_BASE = 1.0  # seconds before a refused private event is offered again; doubled per refusal
PARK_RETRY_CAP = 5.0  # the longest wait between two tries of a refused queue
PARK_LIMIT = 10_000  # refused (parked) events kept per queue before later ones go to its overflow queue
OVERFLOW_SUFFIX = ".overflow"  # `<queue>.overflow`: where events go once a queue's parked set is full
TOPIC_LANE = ""  # the lane of private events no service queue wants: published to the topic exchange
METHOD_FRAME = 1
HEADER_FRAME = 2
FRAME_END = 0xCE
FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload length
METHOD_ID = struct.Struct(">HH")  # class id, method id
CONFIRM = struct.Struct(">QB")  # delivery tag, bits (multiple is bit 0)
CLOSE = struct.Struct(">HB")  # reply code, reply text length
# Content header properties before message-id, in wire order: flag bit, kind (s shortstr, t table, o octet).
PROPERTIES_BEFORE_MESSAGE_ID = (
    (0x8000, "s"), (0x4000, "s"), (0x2000, "t"), (0x1000, "o"), (0x0800, "o"), (0x0400, "s"), (0x0200, "s"),
    (0x0100, "s"),
)  # fmt: skip
MESSAGE_ID_FLAG = 0x0080


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


@dataclass(frozen=True, slots=True)
class Return:
    """basic.return: a mandatory publish reached no queue; its content header (then body) follows, then its ack."""

    code: int
    text: str
    exchange: str
    routing_key: str


Method = Ack | Nack | Blocked | Unblocked | Close | Return


def shortstrs(payload: bytes, pos: int, count: int) -> tuple[list[str], int]:
    """`count` AMQP short strings from `pos`; and the position after them."""
    values = []
    for _ in range(count):
        length = payload[pos]
        values.append(payload[pos + 1 : pos + 1 + length].decode(errors="replace"))
        pos += 1 + length
    return values, pos


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
    if class_id == 60 and method_id == 50:
        (code,) = struct.unpack_from(">H", payload, 4)
        (text, exchange, routing_key), _ = shortstrs(payload, 6, 3)
        return Return(code, text, exchange, routing_key)
    return None


def message_id(header: bytes) -> str:
    """The message-id property of a content header frame's payload; "" when it has none."""
    (flags,) = struct.unpack_from(">H", header, 12)  # after class, weight and body size
    if not flags & MESSAGE_ID_FLAG:
        return ""
    pos = 14
    for flag, kind in PROPERTIES_BEFORE_MESSAGE_ID:
        if flags & flag:
            if kind == "s":
                pos += 1 + header[pos]
            elif kind == "t":
                pos += 4 + int.from_bytes(header[pos : pos + 4])
            else:
                pos += 1
    return shortstrs(header, pos, 1)[0][0]


def topic_matches(pattern: Sequence[str], words: Sequence[str]) -> bool:
    """AMQP topic matching on dot-separated words: `*` is one word, `#` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(topic_matches(rest, words[skip:]) for skip in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and topic_matches(rest, words[1:])


class Routes:
    """Which service queues a private event goes to: the binding patterns of the live private subscriptions."""

    def __init__(self) -> None:
        self.bindings: frozenset[tuple[str, str]] = frozenset()  # (queue, routing key pattern)
        self.queue_names: frozenset[str] = frozenset()
        self.patterns: list[tuple[str, list[str]]] = []
        self.cache: dict[str, tuple[str, ...]] = {}  # routing key -> queues: few keys, asked per event

    def set(self, bindings: Iterable[tuple[str, str]]) -> bool:
        """Replace the bindings; return True when they changed."""
        new = frozenset(bindings)
        if new == self.bindings:
            return False
        self.bindings = new
        self.queue_names = frozenset(queue for queue, _ in new)
        self.patterns = [(queue, pattern.split(".")) for queue, pattern in sorted(new)]
        self.cache = {}
        return True

    def routes_to(self, queue: str) -> bool:
        """True for a queue a live subscription wants, or the overflow queue of one."""
        return queue.removesuffix(OVERFLOW_SUFFIX) in self.queue_names

    def queues(self, routing_key: str) -> tuple[str, ...]:
        """Every queue bound for `routing_key`, each once, in name order."""
        found = self.cache.get(routing_key)
        if found is None:
            words = routing_key.split(".")
            found = tuple(dict.fromkeys(q for q, pattern in self.patterns if topic_matches(pattern, words)))
            self.cache[routing_key] = found
        return found


class Lane:
    """The private events bound for one queue, in the order the queue must get them.

    `waiting` holds, oldest first, what is still to be published to the queue: events it refused
    (a nack: full) or RabbitMQ could not route to it (a return: the queue is gone), everything
    for it that came after them, and, after a lost connection, what was in flight. A lane that
    was refused is `careful` until `waiting` is empty again: it publishes its oldest event alone,
    after a backoff, and the next only once that one was accepted, so the queue never gets
    event N+1 before N (events already on the wire when N was refused are the exception).
    """

    def __init__(self, queue: str) -> None:
        self.queue = queue  # the service queue, or TOPIC_LANE
        self.waiting: deque[tuple[int, Event, bool]] = deque()  # (sequence, event, published before), by sequence
        self.in_flight: dict[int, tuple[int, Event]] = {}  # delivery tag -> (sequence, event)
        self.next_seq = 0
        self.careful = False
        self.refusals = 0  # in a row, for the backoff
        self.retry_at = 0.0
        self.probe = 0  # the tag of the one event a careful lane has in flight, while it has one
        self.spilling = False  # the parked set filled up: later events go to the overflow lane
        self.spilled = 0

    @property
    def parked(self) -> int:
        """Events held back because the queue refused: the whole waiting set of a careful lane."""
        return len(self.waiting) if self.careful else 0

    def due(self, now: float) -> int:
        """How many waiting events may be published now."""
        if not self.careful:
            return len(self.waiting)
        return 1 if self.waiting and not self.in_flight and self.retry_at <= now else 0


class Confirms:
    """Which events RabbitMQ has yet to confirm, and which must be published again.

    Delivery tags count publishes on one channel from 1, so a new connection starts them over.
    `unconfirmed` maps every published tag to its event, in publish order; `lane_of` the tags of
    private publishes to their `Lane`. Market events lost with a connection wait in `retry`;
    private events only ever wait in their lanes (`busy` holds the lanes with events waiting).
    """

    def __init__(
        self, retry_delay: float = PARK_RETRY_BASE, retry_cap: float = PARK_RETRY_CAP, park_limit: int = PARK_LIMIT
    ) -> None:
        self.retry_delay = retry_delay
        self.retry_cap = retry_cap
        self.park_limit = park_limit
        self.unconfirmed: dict[int, Event] = {}
        self.lane_of: dict[int, Lane] = {}
        self.retry: deque[Event] = deque()
        self.lanes: dict[str, Lane] = {}
        self.busy: dict[str, Lane] = {}
        self.next_tag = 1
        self.published = 0
        self.confirmed = 0
        self.republished = 0
        self.nacks = 0
        self.market_nack_drops = 0
        self.returns = 0
        self.spilled = 0
        self.reordered = 0

    @property
    def in_flight(self) -> int:
        return len(self.unconfirmed) + len(self.retry) + sum(len(lane.waiting) for lane in self.busy.values())

    def lane(self, queue: str) -> Lane:
        lane = self.lanes.get(queue)
        if lane is None:
            lane = self.lanes[queue] = Lane(queue)
        return lane

    def hold(self, queue: str, event: Event) -> Lane:
        """Queue a private event for `queue` behind what already waits there; return the lane that took it.

        A lane whose parked set is full (`park_limit`) hands it to the lane of `<queue>.overflow`,
        and keeps doing so until it has caught up: nothing is dropped, and the memory held is
        bounded per queue. An overflow lane never spills further: if that queue refuses too,
        its events stay here.
        """
        lane = self.lane(queue)
        full = lane.spilling or (lane.careful and len(lane.waiting) >= self.park_limit)
        if full and queue and not queue.endswith(OVERFLOW_SUFFIX):
            lane.spilling = True
            lane.spilled += 1
            self.spilled += 1
            lane = self.lane(queue + OVERFLOW_SUFFIX)
        lane.waiting.append((lane.next_seq, event, False))
        lane.next_seq += 1
        self.busy[lane.queue] = lane
        return lane

    def fan_out(self, private: deque[Event], routes: Routes) -> None:
        """Move private events from the hand-off into the lane of every queue bound for them (TOPIC_LANE if none)."""
        queues, hold = routes.queues, self.hold
        while private:
            event = private.popleft()
            for queue in queues(event.routing_key) or (TOPIC_LANE,):
                hold(queue, event)

    def take_lane(self, lane: Lane, limit: int, now: float) -> list[Event]:
        """Up to `limit` of the lane's waiting events that may go out now, oldest first, recorded as published."""
        count = min(limit, lane.due(now))
        if count <= 0:
            return []
        waiting = lane.waiting
        taken = [waiting.popleft() for _ in range(count)]
        if not waiting:
            del self.busy[lane.queue]
        tags = range(self.next_tag, self.next_tag + count)
        events = []
        for tag, (seq, event, before) in zip(tags, taken, strict=True):
            self.unconfirmed[tag] = event
            self.lane_of[tag] = lane
            lane.in_flight[tag] = (seq, event)
            self.republished += before
            events.append(event)
        if lane.careful:
            lane.probe = tags.start
        self.next_tag = tags.stop
        self.published += count
        return events

    def take_retries(self, limit: int) -> list[Event]:
        """Up to `limit` market events to publish again, oldest first; they count as republished."""
        retry = self.retry
        taken = [retry.popleft() for _ in range(min(limit, len(retry)))]
        self.republished += len(taken)
        return taken

    def sent(self, events: Sequence[Event]) -> range:
        """Record market `events` as published in this order; return their delivery tags."""
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
        if self.lane_of:
            for tag in tags:
                lane = self.lane_of.pop(tag, None)
                if lane is not None:
                    self.accepted(lane, tag)
        self.confirmed += len(tags)
        return len(tags)

    def accepted(self, lane: Lane, tag: int) -> None:
        seq, _ = lane.in_flight.pop(tag)
        if lane.waiting and lane.waiting[0][0] < seq:
            self.reordered += 1  # it was on the wire when an earlier one was refused
        if tag == lane.probe:
            lane.probe = 0
            lane.refusals, lane.retry_at = 0, 0.0  # the queue takes events again: the next one goes now
            if not lane.waiting:
                lane.careful = lane.spilling = False

    def nack(self, delivery_tag: int, multiple: bool, now: float) -> list[Event]:
        """Take the refused events back: private ones wait in their lanes, market ones are dropped.

        Returns every refused event, in publish order. Market data is not held back, as the
        hand-off does not hold it when full either: it is counted in `market_nack_drops`.
        """
        refused = []
        for tag in self.settled(delivery_tag, multiple):
            event = self.unconfirmed.pop(tag)
            refused.append(event)
            lane = self.lane_of.pop(tag, None)
            if lane is not None:
                self.refuse(lane, tag, now)
            else:
                self.market_nack_drops += 1
        self.nacks += len(refused)
        return refused

    def returned(self, queue: str, message_id: str, now: float) -> Event | None:
        """RabbitMQ routed the publish of `message_id` to `queue` nowhere: it waits in its lane again.

        Returns the event, or None when no such publish is in flight (its ack, which follows
        the return, then finds nothing to confirm).
        """
        lane = self.lanes.get(queue)
        if lane is None:
            return None
        tag = next((t for t, (_, event) in lane.in_flight.items() if event.id == message_id), None)
        if tag is None:
            return None
        event = self.unconfirmed.pop(tag)
        del self.lane_of[tag]
        self.refuse(lane, tag, now)
        self.returns += 1
        return event

    def refuse(self, lane: Lane, tag: int, now: float) -> None:
        """The queue did not take it: back into `waiting` in sequence order; the lane turns careful."""
        seq, event = lane.in_flight.pop(tag)
        bisect.insort(lane.waiting, (seq, event, True), key=lambda item: item[0])
        self.busy[lane.queue] = lane
        lane.careful = True
        if tag == lane.probe:
            lane.probe = 0
        if lane.retry_at <= now:  # the first refusal of a burst sets the wait; the rest share it
            lane.refusals += 1
            lane.retry_at = now + min(self.retry_cap, self.retry_delay * 2 ** (lane.refusals - 1))

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
        """The connection is gone: every unconfirmed event is to be published again first, oldest first.

        Market events go to the front of `retry`, private ones back into their lanes in sequence
        order (without a backoff: nothing refused them). Returns them all. Tags start over at 1,
        as they will on the next connection's channel.
        """
        pending = list(self.unconfirmed.values())
        market = [event for tag, event in self.unconfirmed.items() if tag not in self.lane_of]
        for tag, lane in self.lane_of.items():
            lane.probe = 0
            seq, event = lane.in_flight.pop(tag)
            bisect.insort(lane.waiting, (seq, event, True), key=lambda item: item[0])
            self.busy[lane.queue] = lane
        self.unconfirmed.clear()
        self.lane_of.clear()
        self.retry.extendleft(reversed(market))
        self.next_tag = 1
        return pending

    def next_retry_at(self) -> float | None:
        """When the earliest careful lane may try its queue again; None if no lane waits for a time."""
        times = [lane.retry_at for lane in self.busy.values() if lane.careful and not lane.in_flight]
        return min(times) if times else None

    def parked(self) -> dict[str, int]:
        """Queue -> events held back because it refused them (overflow queues included)."""
        return {queue: lane.parked for queue, lane in self.busy.items() if lane.parked}

    def spilled_by_queue(self) -> dict[str, int]:
        """Queue -> events sent to its overflow queue since the gateway started."""
        return {queue: lane.spilled for queue, lane in self.lanes.items() if lane.spilled}

    def spilling(self) -> list[str]:
        """The queues whose later events go to their overflow queue now."""
        return sorted(queue for queue, lane in self.lanes.items() if lane.spilling)

    def overflow_queues(self) -> list[str]:
        """The overflow queues events were sent to, for the reconciler to declare."""
        return sorted(queue for queue in self.lanes if queue.endswith(OVERFLOW_SUFFIX))

    def forget_idle(self, keep: Iterable[str]) -> None:
        """Drop the lanes of queues no longer routed to that have nothing waiting or in flight."""
        keep = set(keep)
        for queue, lane in list(self.lanes.items()):
            if queue not in keep and not lane.waiting and not lane.in_flight and not queue.endswith(OVERFLOW_SUFFIX):
                del self.lanes[queue]
