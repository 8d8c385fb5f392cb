"""The RabbitMQ publisher: publisher confirms pipelined, on the gateway's event loop.

Socket readers put events into a `Handoff` and kick the publisher, which writes them in the
same loop tick: one thread, so no GIL hand-off between reading and publishing. py-amqp only
opens the connection (handshake, channel, `confirm.select`); then the socket belongs to
`AmqpProtocol`, which writes pre-packed Basic.Publish frames and reads the few frames RabbitMQ
sends back: acks, nacks, heartbeats, blocked/unblocked, close.

Confirms are pipelined (perf-notes.md: waiting for each ack is 8x slower): up to `window`
events are in flight, each kept in `unconfirmed` until RabbitMQ acks it. When the connection
is lost, every unconfirmed event is published again first after reconnecting, so consumers may
see a duplicate `id` but never a gap (at-least-once).
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections import deque
from urllib.parse import unquote, urlsplit

import amqp
import structlog

from streaming.envelope import Event
from subscriptions.topics import EXCHANGE
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

BATCH = 512  # events written per publishing pass, before acks get a turn
NACK_RETRY_DELAY = 1.0  # seconds before a nacked private event is published again
HEARTBEAT = 30  # AMQP heartbeat, seconds: ours go out every third of it
PUBLISHER_CONNECTION_NAME = "ws-gateway publisher"
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
FRAME_HEADER = struct.Struct(">BHI")

FRAME_END = b"\xce"
# Basic.Publish header property flags: content-type, headers, delivery-mode, message-id, timestamp.
PROPERTY_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0080 | 0x0040
CONTENT_TYPE = b"\x10application/json"


def shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string too long: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def encode_publish(channel_id: int, exchange: bytes, event: Event, frame_max: int) -> bytes:
    """The wire frames of one Basic.Publish: method, content header, body.

    py-amqp builds the same frames through generic, table-driven Python (most of its 60 µs a
    message); every event here has one fixed shape, so it is packed directly. The output is
    checked against what a consumer reads back in tests/test_publisher.py.
    """
    method = b"\x00\x3c\x00\x28\x00\x00" + exchange + shortstr(event.routing_key) + b"\x00"
    trace = event.trace_id.encode()
    klass = event.event_class.encode()
    table = (
        b"\x08trace_idS" + struct.pack(">I", len(trace)) + trace + b"\x05classS" + struct.pack(">I", len(klass)) + klass
    )
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


class Handoff:
    """Bounded hand-off from the socket readers to the publisher.

    Market data is bounded: when full, the oldest market event is dropped and counted.
    Private events are never dropped: they queue without bound (and the depth shows in
    health), because a lost order update costs more than memory.
    """

    def __init__(self, market_limit: int) -> None:
        self.market: deque[Event] = deque()
        self.private: deque[Event] = deque()
        self.market_limit = market_limit
        self.dropped = 0

    def put(self, event: Event) -> None:
        if event.private:
            self.private.append(event)
            return
        if len(self.market) >= self.market_limit:
            self.market.popleft()
            self.dropped += 1
        self.market.append(event)

    def take(self) -> Event | None:
        """Return the next event, private ones first, or None."""
        if self.private:
            return self.private.popleft()
        if self.market:
            return self.market.popleft()
        return None

    def __len__(self) -> int:
        return len(self.market) + len(self.private)


def amqp_params(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return {
        "host": f"{parts.hostname}:{parts.port or 5672}",
        "userid": unquote(parts.username or "guest"),
        "password": unquote(parts.password or "guest"),
        "virtual_host": vhost,
        "ssl": parts.scheme == "amqps",
    }


def connect(url: str, timeout: float = 10.0, heartbeat: int = 0, name: str = "ws-gateway") -> amqp.Connection:
    """Open a py-amqp connection; `name` shows in RabbitMQ's management UI."""
    conn = amqp.Connection(
        **amqp_params(url), connect_timeout=timeout, heartbeat=heartbeat, client_properties={"connection_name": name}
    )
    conn.connect()
    return conn


class AmqpProtocol(asyncio.Protocol):
    """The publishing connection after the handshake: writes frames, reads confirms."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.paused = False  # TCP write buffer full, or RabbitMQ said connection.blocked
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last_received = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost(f"{type(exc).__name__}: {exc}" if exc else "closed by the peer")

    def lost(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.publisher.kick()

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        buffer = self.buffer + data
        pos, size = 0, len(buffer)
        while size - pos >= 8:
            kind, _channel, length = FRAME_HEADER.unpack_from(buffer, pos)
            end = pos + 7 + length
            if end >= size:
                break
            if buffer[end] != 0xCE:
                self.lost("malformed frame from RabbitMQ")
                return
            if kind == 1:
                self.on_method(buffer[pos + 7 : end])
            pos = end + 1
        self.buffer = buffer[pos:]

    def on_method(self, payload: bytes) -> None:
        class_id, method_id = struct.unpack_from(">HH", payload)
        if class_id == 60 and method_id in (80, 120):  # basic.ack, basic.nack
            tag, bits = struct.unpack_from(">QB", payload, 4)
            if method_id == 80:
                self.publisher.on_ack(tag, bool(bits & 1))
            else:
                self.publisher.on_nack(tag, bool(bits & 1))
        elif class_id == 10 and method_id == 60:  # connection.blocked: RabbitMQ is short of resources
            self.paused = True
            log.warning("publisher.blocked_by_broker")
        elif class_id == 10 and method_id == 61:  # connection.unblocked
            self.paused = False
            self.publisher.kick()
        elif (class_id, method_id) in ((10, 50), (20, 40)):  # connection.close, channel.close
            code, length = struct.unpack_from(">HB", payload, 4)
            text = payload[7 : 7 + length].decode(errors="replace")
            self.lost(f"closed by RabbitMQ: {code} {text}")


class Publisher:
    """Owns the AMQP connection of the data path; `run()` keeps it up until stopped."""

    def __init__(
        self,
        url: str,
        handoff: Handoff,
        window: int = 2000,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
    ) -> None:
        self.url = url
        self.handoff = handoff
        self.window = window
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.unconfirmed: dict[int, Event] = {}  # delivery tag -> event, in publish order
        self.retry: deque[Event] = deque()  # published again before anything new
        self.nacked: deque[tuple[float, Event]] = deque()
        self.next_tag = 1
        self.published = 0
        self.confirmed = 0
        self.republished = 0
        self.nacks = 0
        self.market_nack_drops = 0
        self.reconnects = 0
        self.last_error = ""
        self.throttle = LogThrottle()
        self.protocol: AmqpProtocol | None = None
        self.channel_id = 1
        self.frame_max = 131072
        self.scheduled = False
        self.nack_timer: asyncio.TimerHandle | None = None
        self.settled_event = asyncio.Event()
        self.handshake: amqp.Connection | None = None

    @property
    def connected(self) -> bool:
        return self.protocol is not None and not self.protocol.closed.done()

    @property
    def in_flight(self) -> int:
        return len(self.unconfirmed) + len(self.retry) + len(self.nacked)

    def kick(self) -> None:
        """Publish what is waiting, later in this loop tick (once, however many kicks)."""
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.pump)

    @property
    def drained(self) -> bool:
        return not self.in_flight and not len(self.handoff)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a connection up and publishing; return once `stop` is set and nothing is left.

        A stop request does not end reconnecting while events are unconfirmed: they still need
        a broker. The caller bounds that by cancelling this task at its own deadline.
        """
        attempt = 0
        while not (stop.is_set() and self.drained):
            try:
                await self.open()
            except (OSError, amqp.exceptions.AMQPError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            else:
                attempt = 0
                assert self.protocol is not None
                heartbeat = asyncio.create_task(self.heartbeat(self.protocol))
                reason = await self.protocol.closed
                heartbeat.cancel()
                if stop.is_set() and self.drained:
                    return
                self.connection_lost(reason)
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))
            attempt += 1
            log.warning(
                "publisher.reconnecting", delay=round(delay, 3), error=self.last_error, in_flight=self.in_flight
            )
            await asyncio.sleep(delay)

    async def open(self) -> None:
        """Handshake with py-amqp off the loop, then hand its socket to AmqpProtocol."""
        conn = await asyncio.to_thread(self.handshake_blocking)
        sock = conn.transport.sock
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: AmqpProtocol(self), sock=sock)
        self.handshake = conn  # kept so its socket object is not closed under us
        self.protocol = protocol
        self.frame_max = conn.frame_max
        self.next_tag = 1
        log.info("publisher.reconnected" if self.reconnects else "publisher.connected", republishing=len(self.retry))
        self.kick()

    def handshake_blocking(self) -> amqp.Connection:
        conn = connect(self.url, heartbeat=HEARTBEAT, name=PUBLISHER_CONNECTION_NAME)
        channel = conn.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
        channel.confirm_select()
        self.channel_id = channel.channel_id
        return conn

    async def heartbeat(self, protocol: AmqpProtocol) -> None:
        """Send ours; a connection silent for two heartbeat periods is dead."""
        while True:
            await asyncio.sleep(HEARTBEAT / 3)
            if time.monotonic() - protocol.last_received > HEARTBEAT * 2:
                protocol.lost("no heartbeat from RabbitMQ")
                return
            if protocol.transport is not None:
                protocol.transport.write(HEARTBEAT_FRAME)

    def connection_lost(self, reason: str) -> None:
        """Queue every unconfirmed event for publishing again, oldest first."""
        self.reconnects += 1
        self.last_error = reason[:200]
        pending = list(self.unconfirmed.values())
        self.unconfirmed.clear()
        self.retry.extendleft(reversed(pending))
        self.protocol = None
        log.warning("publisher.connection_lost", error=self.last_error, unconfirmed=len(pending))

    def pump(self) -> None:
        """Write waiting events, up to the confirm window and BATCH per pass."""
        self.scheduled = False
        protocol = self.protocol
        if protocol is None or protocol.paused or protocol.closed.done() or protocol.transport is None:
            return
        now = time.monotonic()
        while self.nacked and self.nacked[0][0] <= now:
            self.retry.append(self.nacked.popleft()[1])
        exchange = shortstr(EXCHANGE)
        frames: list[bytes] = []
        while len(frames) < BATCH and len(self.unconfirmed) < self.window:
            if self.retry:
                event = self.retry.popleft()
                self.republished += 1
            else:
                event = self.handoff.take()
                if event is None:
                    break
            frames.append(encode_publish(self.channel_id, exchange, event, self.frame_max))
            self.unconfirmed[self.next_tag] = event
            self.next_tag += 1
        if frames:
            self.published += len(frames)
            protocol.transport.write(b"".join(frames))
            if len(frames) == BATCH:
                self.kick()  # more may wait: let acks and readers in first, then go on
        if self.nacked and self.nack_timer is None:
            self.nack_timer = asyncio.get_running_loop().call_later(NACK_RETRY_DELAY, self.retry_nacked)

    def retry_nacked(self) -> None:
        self.nack_timer = None
        self.kick()

    def on_ack(self, delivery_tag: int, multiple: bool) -> None:
        for tag in self.settled(delivery_tag, multiple):
            del self.unconfirmed[tag]
            self.confirmed += 1
        self.after_settle()

    def on_nack(self, delivery_tag: int, multiple: bool) -> None:
        """RabbitMQ refused: a private queue is full (reject-publish). Keep private events."""
        retry_at = time.monotonic() + NACK_RETRY_DELAY
        trace_id = ""
        for tag in self.settled(delivery_tag, multiple):
            event = self.unconfirmed.pop(tag)
            trace_id = event.trace_id
            self.nacks += 1
            if event.private:
                self.nacked.append((retry_at, event))
            else:
                self.market_nack_drops += 1
        suppressed = self.throttle.allow("nack")
        if suppressed is not None:
            log.warning(
                "publisher.nacked", trace_id=trace_id, total=self.nacks, suppressed=suppressed, hint="a queue is full"
            )
        self.after_settle()

    def after_settle(self) -> None:
        if not self.in_flight and not len(self.handoff):
            self.settled_event.set()
        # Refill once a quarter of the window is free, not on every ack: writing a few frames
        # per ack makes RabbitMQ confirm a few at a time too, and throughput halves.
        if len(self.unconfirmed) <= self.window - self.window // 4:
            self.kick()

    def settled(self, delivery_tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [delivery_tag] if delivery_tag in self.unconfirmed else []
        tags = []
        for tag in self.unconfirmed:  # insertion order is tag order
            if tag > delivery_tag:
                break
            tags.append(tag)
        return tags

    async def flush(self, timeout: float) -> bool:
        """Wait until everything handed off is confirmed; False if `timeout` came first."""
        deadline = time.monotonic() + timeout
        while self.in_flight or len(self.handoff):
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
        if self.protocol is not None:
            self.protocol.lost("closed by the gateway")
