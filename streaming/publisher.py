"""The RabbitMQ publisher: publisher confirms pipelined, on the gateway's event loop.

Socket readers put events into a `Handoff` and kick the publisher, which writes them in the
same loop tick: one thread, so no GIL hand-off between reading and publishing. `AmqpProtocol`
owns the connection on the event loop's own transport (plain TCP, or TLS for amqps://): it
does the AMQP handshake with pamqp (a maintained frame library), writes pre-packed
Basic.Publish frames, takes acks, nacks and returns on a fast path (confirms.py) and lets
pamqp decode every other frame RabbitMQ sends: close, blocked/unblocked, heartbeats.

Confirms are pipelined (perf-notes.md: waiting for each ack is 8x slower): up to `window`
events are in flight, each kept by `Confirms` (confirms.py, which also reads the inbound frames)
until RabbitMQ acks it. When the connection is lost, every unconfirmed event is published again
first after reconnecting, so consumers may see a duplicate `id` but never a gap (at-least-once).

Market data goes to the topic exchange, whose alternate exchange keeps what no queue is bound
for. Private events go to each service queue that wants them (`Routes`), one `mandatory`
publish per queue through the default exchange: a full queue refuses (nack) or a missing one
returns only its own copy, which waits in that queue's lane and is retried with a backoff,
while the other queues get theirs at once.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import amqp
import structlog
from pamqp import commands
from pamqp import encode as pamqp_encode
from pamqp.base import Frame
from pamqp.exceptions import PAMQPException
from pamqp.frame import marshal, unmarshal
from pamqp.header import ProtocolHeader
from pamqp.heartbeat import Heartbeat

from streaming.confirms import (
    FRAME_HEADER,
    HEADER_FRAME,
    METHOD_FRAME,
    PARK_LIMIT,
    Ack,
    AmqpFrame,
    Confirms,
    FrameReader,
    Return,
    Routes,
    decode_method,
    message_id,
)
from streaming.envelope import DataFrame, Event, now_ms
from subscriptions.topics import EXCHANGE
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

BATCH = 512  # events written per publishing pass, before acks get a turn
WRITE_GAP = 0.001  # s: market events are written at most once per this, so a busy loop makes fewer, larger writes
HEARTBEAT = 30  # AMQP heartbeat we ask for, seconds; RabbitMQ may want it shorter (Connection.Tune)
FRAME_MAX = 131072  # largest frame we accept, bytes (py-amqp's and RabbitMQ's default)
CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS and the AMQP handshake together
PUBLISHER_CONNECTION_NAME = "ws-gateway publisher"
HEARTBEAT_FRAME = marshal(Heartbeat(), 0)
ACK_METHODS = (b"\x00\x3c\x00\x50", b"\x00\x3c\x00\x78")  # basic.ack, basic.nack: the fast path
RETURN_METHOD = b"\x00\x3c\x00\x32"  # basic.return: a mandatory publish reached no queue
LAG_WINDOW_MS = 60_000  # the read-lag baseline is the lowest lag of the last one or two such windows
WIDEN_EVERY_MS = 250  # while reads stay late, the interval doubles this often
EASE_EVERY_MS = 4_000  # reads on time this long halve the interval; below the base, pacing ends
LATE_FOR_MS = 250  # late reads must go on this long (no pause over LATE_GAP_MS) to count: a hiccup does not
LATE_GAP_MS = 100
STAY_PACED_MS = 30_000  # after consumers were behind, pacing eases down to its base but ends only this much later
CAPABILITIES = {  # what RabbitMQ may use on this connection
    "publisher_confirms": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
}

FRAME_END = b"\xce"
DEFAULT_EXCHANGE = b"\x00"  # "" as a short string: routes by queue name, has no alternate exchange
MANDATORY = b"\x01"  # Basic.Publish bits: mandatory is bit 0 (immediate, bit 1, RabbitMQ refuses)
# Basic.Publish header property flags: content-type, headers, delivery-mode, message-id, timestamp.
PROPERTY_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0080 | 0x0040
CONTENT_TYPE = b"\x10application/json"


def shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string too long: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


@functools.cache
def epoch_field(epoch: int) -> bytes:
    """The `epoch` header entry; pamqp picks the integer's type (the smallest that fits), once per epoch."""
    return b"\x05epoch" + pamqp_encode.table_integer(epoch)


def encode_publish(
    channel_id: int, exchange: bytes, event: Event, frame_max: int, queue: str = "", bits: bytes = b"\x00"
) -> bytes:
    """The wire frames of one Basic.Publish: method, content header, body.

    py-amqp builds the same frames through generic, table-driven Python (most of its 60 µs a
    message); every event here has one fixed shape, so it is packed directly. The output is
    checked byte for byte against pamqp's marshalling, and against what a consumer reads back,
    in tests/test_publisher.py. With `queue`, the routing key is that queue's name (for the
    default exchange) and the event's own routing key travels in the `routing_key` header.
    """
    method = b"\x00\x3c\x00\x28\x00\x00" + exchange + shortstr(queue or event.routing_key) + bits
    trace = event.trace_id.encode()
    klass = event.event_class.encode()
    # A copy sent to one queue by name keeps the event's own routing key in a header.
    key = b"\x0brouting_keyS" + struct.pack(">I", len(event.routing_key)) + event.routing_key.encode() if queue else b""
    # Keys in sorted order, as pamqp writes tables (the test compares byte for byte).
    table = (
        b"\x05classS" + struct.pack(">I", len(klass)) + klass
        + epoch_field(event.epoch)
        + key
        + b"\x08trace_idS" + struct.pack(">I", len(trace)) + trace
    )  # fmt: skip
    body = event.body
    header = (
        struct.pack(">HHQH", 60, 0, len(body), PROPERTY_FLAGS)
        + CONTENT_TYPE
        + struct.pack(">I", len(table))
        + table
        + (b"\x02" if event.private else b"\x01")
        + shortstr(event.id)
        + struct.pack(">Q", event.received_ts // 1000)
    )
    parts = [
        struct.pack(">BHI", 1, channel_id, len(method)),
        method,
        FRAME_END,
        struct.pack(">BHI", 2, channel_id, len(header)),
        header,
        FRAME_END,
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        piece = body[start : start + chunk]
        parts += [struct.pack(">BHI", 3, channel_id, len(piece)), piece, FRAME_END]
    return b"".join(parts)


def encode_each(
    events: list[Event], channel_id: int, exchange: bytes, frame_max: int
) -> tuple[list[Event], list[bytes], list[tuple[Event, str]]]:
    """Encode one by one: the events kept with their frames, and those AMQP cannot carry, with why.

    An event set aside (a routing key over 255 bytes) gets no delivery tag, so the tags of the
    others stay in step with RabbitMQ's count.
    """
    kept, frames, refused = [], [], []
    for event in events:
        try:
            frames.append(encode_publish(channel_id, exchange, event, frame_max))
        except ValueError as exc:
            refused.append((event, str(exc)[:200]))
            continue
        kept.append(event)
    return kept, frames, refused


class Latest:
    """A book's or ticker's place in the hand-off while it is behind: its newest state, made when taken."""

    __slots__ = ("frame", "key")

    def __init__(self, key: tuple[str, str], frame: DataFrame) -> None:
        self.key = key  # (socket category, Bybit topic)
        self.frame = frame  # the topic's latest frame


class Pacing:
    """Whether the gateway reads its sockets late, and how often a book or ticker may go out meanwhile.

    A frame's read lag is the time from its exchange `ts` to the moment the gateway read it. It
    is late when it is `limit_ms` above the lowest read lag of the last minute or two (so a
    steady network delay or clock offset does not count; the baseline stands still while the
    gateway is behind). Late frames for `LATE_FOR_MS` on end put the gateway behind (one pause,
    a collection or a busy scheduler, makes a burst of late frames and then none: not behind).
    Meanwhile each book and ticker topic goes out at most once per `interval_ms`: `base_ms` at
    first, doubled every `WIDEN_EVERY_MS` while a read is still late (up to `max_ms`), so the hand-off
    sheds what RabbitMQ and consumers are given fast enough to catch up before a backlog of
    seconds builds in the sockets. Once reads are on time the interval halves every
    `EASE_EVERY_MS`, and pacing ends below `base_ms`: a lasting overload settles on the
    shortest interval it can keep up with instead of swinging between none and the longest.
    While `downstream` is set (a consumer's market queue holds a backlog: Reconciler.watch_backlog)
    every frame counts as late, and the gateway is behind at once: RabbitMQ and the consumers are
    given less until they catch up. Pacing then ends only `STAY_PACED_MS` after the last backlog
    (the full rate would build it again).
    """

    def __init__(self, limit_ms: int = 100, base_ms: int = 100, max_ms: int = 1_000) -> None:
        self.limit_ms, self.base_ms, self.max_ms = limit_ms, base_ms, max(base_ms, max_ms)
        self.interval_ms = base_ms
        self.behind = False
        self.changed_at = 0  # ms, like received_ts: the interval's last change
        self.late_since = self.last_late = -(1 << 62)  # the run of late frames going on, if any
        self.floor = self.window_min = 1 << 62  # the previous window's lowest read lag, and this one's
        self.window_end = 0
        self.downstream = False  # a consumer's queue holds a backlog
        self.downstream_at = -(1 << 62)  # ms: when one last did

    def late(self, received: int, exchange_ts: object) -> bool:
        """Whether the gateway is behind (see the class), given a book or ticker frame just read."""
        if type(exchange_ts) is not int:
            return self.behind
        lag = received - exchange_ts
        if lag < self.window_min:
            self.window_min = lag
        if received >= self.window_end and not self.behind:
            self.floor, self.window_min, self.window_end = self.window_min, lag, received + LAG_WINDOW_MS
        if lag - min(self.floor, self.window_min) <= self.limit_ms and not self.downstream:
            return self.behind
        if self.behind:  # still late: widen, however sparse the reads (a held topic is not read again)
            self.last_late = received
            if received - self.changed_at >= WIDEN_EVERY_MS:
                self.interval_ms, self.changed_at = min(2 * self.interval_ms, self.max_ms), received
            return True
        if received - self.last_late > LATE_GAP_MS:
            self.late_since = received
        self.last_late = received
        if received - self.late_since < LATE_FOR_MS and not self.downstream:  # a queue's backlog is no hiccup
            return False
        self.behind, self.interval_ms, self.changed_at = True, self.base_ms, received
        return True

    def above_usual(self, received: int, exchange_ts: object) -> int:
        """How much later than the usual read lag a frame was read (ms; 0 without an exchange time)."""
        if type(exchange_ts) is not int:
            return 0
        return received - exchange_ts - min(self.floor, self.window_min)

    def consumers_behind(self, behind: bool, now_ms: int) -> None:
        """A service's market queue holds a backlog (or no longer does): Reconciler.watch_backlog."""
        self.downstream = behind
        if behind:
            self.downstream_at = now_ms

    def ease(self, now_ms: int) -> None:
        """Halve the interval once reads have been on time for `EASE_EVERY_MS`; below the base, stop pacing.

        Called on a timer, not per frame: a feed that went quiet must not leave the gateway behind.
        """
        if self.behind and now_ms - max(self.last_late, self.changed_at) >= EASE_EVERY_MS:
            self.interval_ms //= 2
            self.changed_at = now_ms
            if self.interval_ms < self.base_ms:
                # Consumers that were behind lately would be again at the full rate: stay at the base.
                ended = now_ms - self.downstream_at >= STAY_PACED_MS
                self.behind, self.interval_ms = not ended, self.base_ms


class Handoff:
    """Bounded hand-off from the socket readers to the publisher.

    Private events come first and are never dropped: they queue without bound (the depth shows
    in health), because a lost order update costs more than memory. Market data is bounded.

    Books and tickers conflate when the gateway is behind: a topic keeps one place (a `Latest`),
    and the publisher gets its newest state as one snapshot when it reaches that place, instead
    of every delta that led there. Behind means either of two things:
    - `conflate_at` market events wait for the publisher (RabbitMQ takes them slower than they come);
    - the gateway reads its sockets late (`Pacing`): each book and ticker topic then goes out
      at most once per `pacing.interval_ms`; frames in between fold into a place that is `held`
      until the first frame read after its slot (or `release`, for a quiet topic) queues it.
      The load on RabbitMQ and consumers falls to a rate they can take, the sockets are read on
      time again, and trades keep flowing.
    Trades, liquidations and klines never conflate; only when the queue is full is the oldest
    market event dropped and counted.
    """

    def __init__(
        self,
        market_limit: int,
        backpressure_at: int | None = None,
        max_read_pause: float = 0.5,
        conflate_at: int | None = None,
        render: Callable[[DataFrame], Event | None] | None = None,
        pacing: Pacing | None = None,
        build: Callable[[DataFrame], Event] | None = None,
    ) -> None:
        self.market: deque[Event | Latest] = deque()
        self.private: deque[Event] = deque()
        self.latest: dict[tuple[str, str], Latest] = {}  # the conflating topics' places, in `market` or held
        self.held: dict[tuple[str, str], Latest] = {}  # places waiting for their topic's interval to end
        self.next_at: dict[tuple[str, str], int] = {}  # ms: a topic's next place goes out no sooner
        self.market_limit = market_limit
        self.backpressure_at = backpressure_at if backpressure_at is not None else market_limit
        self.conflate_at = conflate_at if conflate_at is not None else market_limit
        self.max_read_pause = max_read_pause
        self.render = render  # Envelopes.latest
        self.build = build  # Envelopes.event: a frame's own event, made only when it goes out as it is
        self.pacing = pacing or Pacing()
        self.dropped = 0
        self.conflated = 0  # frames folded into their topic's newest state, never published alone
        self.read_pauses = 0

    def put(self, event: Event) -> None:
        if event.private:
            self.private.append(event)
        else:
            self.put_market(event)

    def put_market(self, item: Event | Latest) -> None:
        if len(self.market) >= self.market_limit:
            oldest = self.market.popleft()
            if type(oldest) is Latest:
                del self.latest[oldest.key]
            self.dropped += 1
        self.market.append(item)

    def offer(self, frame: DataFrame) -> int:
        """Queue a data frame's events; return how many went in (0: folded into its topic's newest state)."""
        if frame.conflatable and self.render is not None:
            key = (frame.category, frame.topic)
            place = self.latest.get(key)
            received = frame.received_ts
            if place is not None:
                place.frame = frame
                self.conflated += 1
                if key in self.held and received >= self.next_at.get(key, 0):
                    self.send_held(key, received)  # its interval is over: out now, with what was just read
                return 0
            if self.pacing.late(received, frame.parsed.get("ts")):
                if received < self.next_at.get(key, 0):
                    self.latest[key] = self.held[key] = Latest(key, frame)
                    return 1
                self.next_at[key] = self.slot_after(key, received)
            elif len(self.market) >= self.conflate_at:
                self.latest[key] = place = Latest(key, frame)
                self.put_market(place)
                return 1
        if frame.pending:
            self.build(frame)  # type: ignore[misc]
        for event in frame.events:
            self.put(event)
        return len(frame.events)

    def release(self, now_ms: int, every: bool = False) -> int:
        """Queue the held places of quiet topics (`every`: all of them); return how many.

        A held topic goes out with the first frame read after its interval is over (`offer`), so
        its snapshot carries the newest news, not a frame that waited out the interval. Only a
        topic that sends nothing newer for `pacing.base_ms` past its slot is sent from here.
        """
        quiet_before = now_ms - self.pacing.base_ms
        due = [key for key in self.held if every or self.next_at.get(key, 0) <= quiet_before]
        for key in due:
            self.send_held(key, now_ms)
        return len(due)

    def send_held(self, key: tuple[str, str], now_ms: int) -> None:
        self.put_market(self.held.pop(key))
        self.next_at[key] = self.slot_after(key, now_ms)

    def slot_after(self, key: tuple[str, str], after: int) -> int:
        """The first moment after `after` (at most an interval on) in the topic's own slot of the interval.

        Each topic has its slot (by its key's hash), so paced topics go out spread over the
        interval rather than all in the same release: hundreds of snapshots at once would make
        a burst that RabbitMQ and consumers, and every trade behind it, would wait through.
        """
        interval = self.pacing.interval_ms
        return after + ((hash(key) - after) % interval or interval)

    def take(self) -> Event | None:
        """Return the next event, private ones first, or None."""
        if self.private:
            return self.private.popleft()
        while self.market:
            item = self.market.popleft()
            if type(item) is not Latest:
                return item
            del self.latest[item.key]
            event = self.render(item.frame)  # type: ignore[misc]
            if event is not None:
                return event
            self.dropped += 1  # the gateway left the topic meanwhile
        return None

    def __len__(self) -> int:
        return len(self.market) + len(self.private) + len(self.held)

    def backlogged(self) -> bool:
        return len(self.market) > self.backpressure_at

    async def relieve(self) -> None:
        """Pause a market reader until the publisher has halved the backlog, `max_read_pause` s at most.

        While the readers wait, the loop runs the publisher and reads RabbitMQ's acks, and TCP
        tells the exchange to slow down. Only if the backlog outlasts the pause does the
        hand-off start dropping the oldest market events. The private socket never waits here.
        """
        self.read_pauses += 1
        deadline = time.monotonic() + self.max_read_pause
        target = self.backpressure_at // 2
        while len(self.market) > target and time.monotonic() < deadline:
            await asyncio.sleep(0.002)


def negotiate(ours: int, theirs: int) -> int:
    """A Connection.Tune limit both sides accept: the smaller one, where 0 means "no limit" on either side."""
    return min(ours, theirs) if ours and theirs else max(ours, theirs)


def tls_settings() -> dict[str, Any]:
    """RABBITMQ_TLS_* as read now (tests and operators may change them between connections)."""
    from django.conf import settings

    return {
        "ca_file": settings.RABBITMQ_TLS_CA_FILE,
        "verify": settings.RABBITMQ_TLS_VERIFY,
        "cert_file": settings.RABBITMQ_TLS_CERT_FILE,
        "key_file": settings.RABBITMQ_TLS_KEY_FILE,
    }


def ssl_context(ca_file: str = "", verify: bool = True, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """The publisher's TLS context for amqps://: certificate and host name checked unless `verify` is off."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


def ssl_options(host: str, ca_file: str = "", verify: bool = True, cert_file: str = "", key_file: str = "") -> dict:
    """The same TLS settings as py-amqp's `ssl` options (Connection(ssl=...), its SSLTransport._wrap_socket_sni).

    With `server_hostname`, py-amqp checks the host name; it cannot be combined with CERT_NONE,
    so an unverified connection goes without it (and without SNI).
    """
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE}
    if verify:
        options["server_hostname"] = host
        if ca_file:
            options["ca_certs"] = ca_file
    if cert_file:
        options["certfile"] = cert_file
        options["keyfile"] = key_file or None
    return options


def amqp_params(url: str) -> dict[str, object]:
    """py-amqp's Connection arguments for `url`; amqps:// adds the RABBITMQ_TLS_* settings."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    tls = parts.scheme == "amqps"
    return {
        "host": f"{parts.hostname}:{parts.port or (5671 if tls else 5672)}",
        "userid": unquote(parts.username or "guest"),
        "password": unquote(parts.password or "guest"),
        "virtual_host": vhost,
        "ssl": ssl_options(parts.hostname or "", **tls_settings()) if tls else False,
    }


def connect(url: str, timeout: float = 10.0, heartbeat: int = 0, name: str = "ws-gateway") -> amqp.Connection:
    """Open a py-amqp connection; `name` shows in RabbitMQ's management UI."""
    conn = amqp.Connection(
        **amqp_params(url), connect_timeout=timeout, heartbeat=heartbeat, client_properties={"connection_name": name}
    )
    conn.connect()
    return conn


MethodT = TypeVar("MethodT", bound=Frame)


def declare_events_exchange(conn: amqp.Connection, channel: amqp.Channel) -> amqp.Channel:
    """Declare the events exchange (topic, durable, no arguments); return the channel to go on with.

    Its alternate exchange is set by a policy (reconciler.py `Bindings`), not an argument, so
    every client that declares it plainly (consumers, tail_events) keeps working. One made with
    arguments by someone else is used as it is: RabbitMQ refuses a redeclare with other
    arguments (PRECONDITION_FAILED, which closes the channel), and refusing to publish would
    lose far more than the difference.
    """
    try:
        channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
        return channel
    except amqp.exceptions.PreconditionFailed as exc:
        if EXCHANGE_THROTTLE.allow("exchange") is not None:
            log.warning("exchange.arguments_differ", exchange=EXCHANGE, error=str(exc)[:300])
        channel = conn.channel()
        channel.exchange_declare(EXCHANGE, "topic", passive=True)
        return channel


EXCHANGE_THROTTLE = LogThrottle(interval=600.0)


class AmqpProtocol(asyncio.Protocol):
    """The publishing connection: AMQP handshake, then writes frames and reads confirms.

    No socket options of its own (no read timeout): the negotiated heartbeat judges liveness.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.writing_paused = False  # the TCP write buffer is full
        self.blocked_by_broker = False  # RabbitMQ said connection.blocked
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last_received = time.monotonic()
        self.inbox: asyncio.Queue[Frame | str] | None = asyncio.Queue()  # handshake replies; str: lost
        self.heartbeat = 0  # seconds, negotiated; 0: off
        self.frame_max = FRAME_MAX
        self.tls = False
        self.returning: Return | None = None  # a basic.return whose content header is still to come

    @property
    def writable(self) -> bool:
        return not (self.writing_paused or self.blocked_by_broker or self.closed.done()) and self.transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(marshal(ProtocolHeader(), 0))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost(f"{type(exc).__name__}: {exc}" if exc else "closed by the peer")

    def lost(self, reason: str) -> None:
        """The connection is unusable: say why (once) and drop it, discarding unsent data."""
        self.finish(reason)
        if self.transport is not None:
            self.transport.abort()

    def finish(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.inbox is not None:
            self.inbox.put_nowait(reason)

    def close_after(self, frames: bytes, reason: str) -> None:
        """Write `frames` (a Close or Close-Ok), then close: the buffered data still goes out first."""
        self.finish(reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames)
            self.transport.close()

    def send(self, channel: int, method: Frame) -> None:
        assert self.transport is not None
        self.transport.write(marshal(method, channel))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.publisher.kick()

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        for amqp_frame in self.reader.feed(data):
            kind, payload = amqp_frame.kind, amqp_frame.payload
            if kind == METHOD_FRAME and payload.startswith(ACK_METHODS):
                method = decode_method(payload)
                if type(method) is Ack:
                    self.publisher.on_ack(method.delivery_tag, method.multiple)
                else:
                    self.publisher.on_nack(method.delivery_tag, method.multiple)  # type: ignore[union-attr]
            elif kind == METHOD_FRAME and payload.startswith(RETURN_METHOD):
                self.returning = decode_method(payload)  # type: ignore[assignment]
            elif kind == HEADER_FRAME and self.returning is not None:
                self.publisher.on_return(self.returning, message_id(payload))
                self.returning = None
            elif kind not in (3, 8):  # a returned body is not needed; heartbeats only prove the connection alive
                self.on_frame(amqp_frame)
        if self.reader.malformed:
            self.lost("malformed frame from RabbitMQ")

    def on_frame(self, amqp_frame: AmqpFrame) -> None:
        """Any frame but an ack, a return or a heartbeat: pamqp decodes it."""
        raw = FRAME_HEADER.pack(amqp_frame.kind, amqp_frame.channel, len(amqp_frame.payload)) + amqp_frame.payload
        try:
            _, channel, value = unmarshal(raw + b"\xce")
        except PAMQPException as exc:
            self.lost(f"undecodable frame from RabbitMQ: {exc}"[:200])
            return
        match value:
            case commands.Connection.Close():
                reason = f"closed by RabbitMQ: {value.reply_code} {value.reply_text}"
                self.close_after(marshal(commands.Connection.CloseOk(), 0), reason)
            case commands.Channel.Close():
                # The channel is gone and with it the confirm mode: start over on a new connection.
                reason = f"channel closed by RabbitMQ: {value.reply_code} {value.reply_text}"
                goodbye = commands.Connection.Close(200, "channel closed", 0, 0)
                self.close_after(marshal(commands.Channel.CloseOk(), channel) + marshal(goodbye, 0), reason)
            case commands.Connection.CloseOk():
                self.lost("closed")
            case commands.Connection.Blocked():
                self.blocked_by_broker = True
                log.warning("publisher.blocked_by_broker", reason=value.reason)
            case commands.Connection.Unblocked():
                self.blocked_by_broker = False
                log.info("publisher.unblocked_by_broker")
                self.publisher.kick()
            case _ if self.inbox is not None:
                self.inbox.put_nowait(value)

    async def beat(self) -> None:
        """Send a heartbeat every half agreed period; a connection silent for two periods is dead."""
        period = self.heartbeat
        while not self.closed.done():
            await asyncio.sleep(period / 2)
            if time.monotonic() - self.last_received > period * 2:
                self.lost(f"no heartbeat from RabbitMQ for {period * 2} s")
                return
            if self.transport is not None:
                self.transport.write(HEARTBEAT_FRAME)

    async def expect(self, kind: type[MethodT]) -> MethodT:
        """The next handshake reply, which must be a `kind`; ConnectionError if the connection ends first."""
        assert self.inbox is not None
        value = await self.inbox.get()
        if isinstance(value, str):
            raise ConnectionError(value)
        if not isinstance(value, kind):
            raise ConnectionError(f"expected {kind.name} from RabbitMQ, got {value.name}")
        return value

    async def handshake(self, url: str, heartbeat: int, name: str, exchange: str) -> None:
        """Log in, open channel 1 with the exchange declared and confirms on; then the connection publishes."""
        parts = urlsplit(url)
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        start = await self.expect(commands.Connection.Start)
        if "PLAIN" not in start.mechanisms.split():
            raise ConnectionError(f"RabbitMQ does not offer PLAIN login: {start.mechanisms}")
        properties = {"product": "ws-gateway", "connection_name": name, "capabilities": CAPABILITIES}
        self.send(0, commands.Connection.StartOk(properties, "PLAIN", f"\0{user}\0{password}"))
        tune = await self.expect(commands.Connection.Tune)
        self.heartbeat = negotiate(heartbeat, tune.heartbeat) if heartbeat else 0
        self.frame_max = negotiate(FRAME_MAX, tune.frame_max)
        self.send(0, commands.Connection.TuneOk(tune.channel_max, self.frame_max, self.heartbeat))
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.send(0, commands.Connection.Open(vhost))
        await self.expect(commands.Connection.OpenOk)
        self.send(1, commands.Channel.Open())
        await self.expect(commands.Channel.OpenOk)
        self.send(1, commands.Exchange.Declare(exchange=exchange, exchange_type="topic", durable=True))
        await self.expect(commands.Exchange.DeclareOk)
        self.send(1, commands.Confirm.Select())
        await self.expect(commands.Confirm.SelectOk)
        self.inbox = None


class SetAside:
    """Events AMQP cannot carry (a routing key over 255 bytes): logged and counted, never retried."""

    def __init__(self) -> None:
        self.count = 0
        self.throttle = LogThrottle()

    def screen(self, private: deque[Event]) -> None:
        """Take private events AMQP cannot carry out of the hand-off, before they get a lane and a tag."""
        refused = [(e, "routing key over 255 bytes") for e in private if len(e.routing_key.encode()) > 255]
        for event, _ in refused:
            private.remove(event)
        if refused:
            self.add(refused)

    def add(self, refused: list[tuple[Event, str]]) -> None:
        self.count += len(refused)
        suppressed = self.throttle.allow("unencodable")
        if suppressed is not None:
            event, error = refused[0]
            log.error(
                "publisher.unencodable",
                id=event.id,
                trace_id=event.trace_id,
                event_class=event.event_class,
                routing_key=event.routing_key[:80],
                error=error,
                total=self.count,
                suppressed=suppressed + len(refused) - 1,
            )


class Connector:
    """Keeps the publisher's AMQP connection up: connect (TLS for amqps://), handshake, heartbeat, backoff."""

    def __init__(
        self, publisher: Publisher, backoff_base: float, backoff_cap: float, healthy_after: float, heartbeat: int
    ) -> None:
        self.publisher = publisher
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.healthy_after = healthy_after  # seconds up before a connection resets the backoff
        self.heartbeat_wanted = heartbeat
        self.attempt = 0  # consecutive connections that failed or died young: the backoff exponent

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a connection up and publishing; return once `stop` is set and nothing is left.

        A stop request does not end reconnecting while events are unconfirmed: they still need
        a broker. The caller bounds that by cancelling this task at its own deadline. The backoff
        grows until a connection has stayed up `healthy_after` seconds: a broker that accepts
        the handshake and then drops us at once is not hammered.
        """
        publisher = self.publisher
        while not (stop.is_set() and publisher.drained):
            try:
                publisher.connected_to(await self.open())
            except (OSError, TimeoutError) as exc:
                publisher.last_error = f"{type(exc).__name__}: {exc}"[:200]
            else:
                protocol = publisher.protocol
                assert protocol is not None
                opened_at = time.monotonic()
                beating = asyncio.create_task(protocol.beat()) if protocol.heartbeat else None
                reason = await protocol.closed
                if beating is not None:
                    beating.cancel()
                if time.monotonic() - opened_at >= self.healthy_after:
                    self.attempt = 0
                if stop.is_set() and publisher.drained:
                    return
                publisher.connection_lost(reason)
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**self.attempt))
            self.attempt += 1
            log.warning(
                "publisher.reconnecting",
                delay=round(delay, 3),
                attempt=self.attempt,
                error=publisher.last_error,
                in_flight=publisher.in_flight,
            )
            await asyncio.sleep(delay)

    async def open(self) -> AmqpProtocol:
        """Connect on the loop's own transport (TLS for amqps://) and handshake with pamqp."""
        url = self.publisher.url
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, protocol = await loop.create_connection(
                lambda: AmqpProtocol(self.publisher),
                parts.hostname,
                parts.port or (5671 if tls else 5672),
                ssl=ssl_context(**tls_settings()) if tls else None,
                server_hostname=parts.hostname if tls else None,
            )
            try:
                await protocol.handshake(url, self.heartbeat_wanted, PUBLISHER_CONNECTION_NAME, EXCHANGE)
            except BaseException:
                protocol.lost("handshake failed")
                raise
        protocol.tls = tls
        return protocol


class Passes:
    """When the next publishing pass runs: once however many kicks, and market events at most once per WRITE_GAP.

    Each write to RabbitMQ's socket wakes the broker, and a loop reading 40,000 frames a second
    would otherwise write a few events a time. A pass with a private event waiting runs in this
    loop tick, whatever waits.
    """

    __slots__ = ("delayed", "pump", "scheduled", "written_at")

    def __init__(self, pump: Callable[[], None]) -> None:
        self.pump = pump
        self.scheduled = False
        self.delayed: asyncio.TimerHandle | None = None  # a pass waiting out WRITE_GAP
        self.written_at = 0.0  # loop time of the last write

    def ask(self, private: bool) -> None:
        if self.scheduled:
            if self.delayed is not None and private:
                self.delayed.cancel()
                self.delayed = None
                asyncio.get_running_loop().call_soon(self.pump)
            return
        loop = asyncio.get_running_loop()
        self.scheduled = True
        wait = self.written_at + WRITE_GAP - loop.time()
        if wait > 0 and not private:
            self.delayed = loop.call_later(wait, self.pump)
        else:
            loop.call_soon(self.pump)

    def started(self) -> None:
        self.scheduled, self.delayed = False, None


class Publisher:
    """Owns the AMQP connection of the data path; `run()` keeps it up until stopped."""

    def __init__(
        self,
        url: str,
        handoff: Handoff,
        window: int = 2000,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        healthy_after: float = 60.0,
        heartbeat: int = HEARTBEAT,
        park_limit: int = PARK_LIMIT,
        on_route_lost: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.handoff = handoff
        self.window = window
        self.connector = Connector(self, backoff_base, backoff_cap, healthy_after, heartbeat)
        self.confirms = Confirms(park_limit=park_limit)
        self.routes = Routes()
        self.on_route_lost = on_route_lost  # after a reconnect or a return: have the queues declared again
        self.reconnects = 0
        self.last_error = ""
        self.throttle = LogThrottle()
        self.protocol: AmqpProtocol | None = None
        self.channel_id = 1
        self.frame_max = FRAME_MAX
        self.passes = Passes(self.pump)
        self.retry_timer: asyncio.TimerHandle | None = None
        self.retry_timer_at = 0.0
        self.settled_event = asyncio.Event()
        self.set_aside = SetAside()

    @property
    def connected(self) -> bool:
        return self.protocol is not None and not self.protocol.closed.done()

    @property
    def blocked(self) -> bool:
        """RabbitMQ said connection.blocked (an alarm: memory or disk) and has not unblocked yet."""
        return self.protocol is not None and self.protocol.blocked_by_broker

    @property
    def in_flight(self) -> int:
        return self.confirms.in_flight

    @property
    def published(self) -> int:
        return self.confirms.published

    @property
    def confirmed(self) -> int:
        return self.confirms.confirmed

    @property
    def republished(self) -> int:
        return self.confirms.republished

    @property
    def nacks(self) -> int:
        return self.confirms.nacks

    def route_private(self, bindings: Iterable[tuple[str, str]]) -> None:
        """Set which queues private events go to: (queue, routing key pattern) of each live private subscription."""
        if self.routes.set(bindings):
            self.confirms.forget_idle(queue for queue, _ in self.routes.bindings)

    def to_queue(self, queue: str, events: Iterable[Event]) -> None:
        """Publish private events to one service queue only (a late joiner's snapshot), in order."""
        for event in events:
            self.confirms.hold(queue, event)
        self.kick()

    def private_pending_since(self) -> dict[str, int]:
        """Per private class, when the oldest event RabbitMQ has not confirmed yet was read (ms)."""
        oldest: dict[str, int] = {}
        waiting = (event for lane in self.confirms.busy.values() for _, event, _ in lane.waiting)
        for event in chain(self.handoff.private, self.confirms.unconfirmed.values(), waiting):
            if event.private and event.received_ts < oldest.get(event.event_class, event.received_ts + 1):
                oldest[event.event_class] = event.received_ts
        return oldest

    def kick(self) -> None:
        """Publish what is waiting: in this loop tick, or for market events alone after WRITE_GAP (Passes)."""
        self.passes.ask(bool(self.handoff.private))

    @property
    def drained(self) -> bool:
        return not self.in_flight and not len(self.handoff)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a connection up and publishing until `stop` is set and nothing is left (Connector.run)."""
        await self.connector.run(stop)

    @property
    def attempt(self) -> int:
        return self.connector.attempt

    @property
    def unencodable(self) -> int:
        return self.set_aside.count

    def connected_to(self, protocol: AmqpProtocol) -> None:
        """A new connection is ready: publish on it, the unconfirmed first; have queues declared again."""
        self.protocol = protocol
        self.frame_max = protocol.frame_max
        log.info(
            "publisher.reconnected" if self.reconnects else "publisher.connected",
            republishing=len(self.confirms.retry),
            heartbeat=protocol.heartbeat,
            tls=protocol.tls,
        )
        if self.reconnects and self.on_route_lost is not None:
            self.on_route_lost()  # a broker that restarted without its definitions has no queues
        self.kick()

    def connection_lost(self, reason: str) -> None:
        """Queue every unconfirmed event for publishing again, oldest first."""
        self.reconnects += 1
        self.last_error = reason[:200]
        pending = self.confirms.requeue_all()
        self.protocol = None
        log.warning("publisher.connection_lost", error=self.last_error, unconfirmed=len(pending))

    def pump(self) -> None:
        """Write waiting events, up to the confirm window and BATCH per pass: private lanes first."""
        self.passes.started()
        protocol = self.protocol
        if protocol is None or not protocol.writable:
            return
        confirms = self.confirms
        if self.handoff.private:
            self.set_aside.screen(self.handoff.private)
            confirms.fan_out(self.handoff.private, self.routes)
        room = min(BATCH, self.window - len(confirms.unconfirmed))
        channel_id, exchange, frame_max = self.channel_id, shortstr(EXCHANGE), self.frame_max
        frames: list[bytes] = []
        more = False  # a full pass: more may wait
        if confirms.busy and room > 0:
            now = time.monotonic()
            for lane in list(confirms.busy.values()):
                # A service queue by name through the default exchange, or (TOPIC_LANE) the events exchange.
                to, bits = (DEFAULT_EXCHANGE, MANDATORY) if lane.queue else (exchange, b"\x00")
                for event in confirms.take_lane(lane, room - len(frames), now):
                    frames.append(encode_publish(channel_id, to, event, frame_max, lane.queue, bits))
            room -= len(frames)
        events = confirms.take_retries(room)  # published again before anything new
        take = self.handoff.take
        while len(events) < room and (event := take()) is not None:
            events.append(event)
        if events:
            more = len(events) == room
            try:
                frames += [encode_publish(channel_id, exchange, event, frame_max) for event in events]
            except ValueError:
                events, encoded, refused = encode_each(events, channel_id, exchange, frame_max)
                frames += encoded
                self.set_aside.add(refused)
            confirms.sent(events)
        if frames:
            protocol.transport.write(b"".join(frames))  # type: ignore[union-attr]
            self.passes.written_at = asyncio.get_running_loop().time()
        if more or len(frames) >= BATCH:
            self.kick()  # more may wait: let acks and readers in first, then go on
        if confirms.busy:
            self.schedule_retry()

    def schedule_retry(self) -> None:
        """Wake up when the earliest refused queue may be tried again."""
        at = self.confirms.next_retry_at()
        if at is not None and (self.retry_timer is None or at < self.retry_timer_at):
            if self.retry_timer is not None:
                self.retry_timer.cancel()
            self.retry_timer_at = at
            self.retry_timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self.retry_parked)

    def retry_parked(self) -> None:
        self.retry_timer = None
        self.kick()

    def on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self.confirms.ack(delivery_tag, multiple)
        self.after_settle()

    def on_nack(self, delivery_tag: int, multiple: bool) -> None:
        """RabbitMQ refused: a private queue is full (reject-publish). Keep private events."""
        refused = self.confirms.nack(delivery_tag, multiple, time.monotonic())
        if (suppressed := self.throttle.allow("nack")) is not None:
            log.warning(
                "publisher.nacked",
                trace_id=refused[-1].trace_id if refused else "",
                total=self.confirms.nacks,
                parked=self.confirms.parked(),
                suppressed=suppressed,
                hint="a queue is full",
            )
        self.after_settle()

    def on_return(self, returned: Return, message_id: str) -> None:
        """A private publish reached no queue (it was deleted): retry it, and have the queues declared again."""
        event = self.confirms.returned(returned.routing_key, message_id, time.monotonic())
        if (suppressed := self.throttle.allow("return")) is not None:
            log.warning(
                "publisher.returned",
                queue=returned.routing_key,
                reply=f"{returned.code} {returned.text}",
                trace_id=event.trace_id if event else "",
                total=self.confirms.returns,
                suppressed=suppressed,
            )
        if self.on_route_lost is not None and self.routes.routes_to(returned.routing_key):
            self.on_route_lost()  # not for a queue no subscription wants any more: it stays gone
        self.kick()

    def after_settle(self) -> None:
        if not self.in_flight and not len(self.handoff):
            self.settled_event.set()
        # Refill once a quarter of the window is free, not on every ack: writing a few frames
        # per ack makes RabbitMQ confirm a few at a time too, and throughput halves.
        if len(self.confirms.unconfirmed) <= self.window - self.window // 4:
            self.kick()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything handed off is confirmed; False if `timeout` came first."""
        deadline = time.monotonic() + timeout
        while self.in_flight or len(self.handoff):
            self.handoff.release(now_ms(), every=True)  # held books and tickers go now
            self.settled_event.clear()
            self.kick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.settled_event.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return True

    def close(self) -> None:
        """Say goodbye to RabbitMQ (Connection.Close) and close once the buffered frames are out."""
        if self.protocol is not None:
            goodbye = marshal(commands.Connection.Close(200, "gateway stopping", 0, 0), 0)
            self.protocol.close_after(goodbye, "closed by the gateway")
