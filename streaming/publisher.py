"""The RabbitMQ publisher: publisher confirms pipelined, on the gateway's event loop.

Socket readers put events into a `Handoff` and kick the publisher, which writes them in the
same loop tick: one thread, so no GIL hand-off between reading and publishing. py-amqp only
opens the connection (handshake, channel, `confirm.select`); then the socket belongs to
`AmqpProtocol`, which writes pre-packed Basic.Publish frames and reads the few frames RabbitMQ
sends back: acks, nacks, returns, heartbeats, blocked/unblocked, close.

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
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import unquote, urlsplit

import amqp
import structlog

from streaming.confirms import (
    HEADER_FRAME,
    METHOD_FRAME,
    PARK_LIMIT,
    Ack,
    Blocked,
    Close,
    Confirms,
    FrameReader,
    Method,
    Nack,
    Return,
    Routes,
    Unblocked,
    decode_method,
    message_id,
)
from streaming.envelope import Event
from subscriptions.topics import EXCHANGE
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

BATCH = 512  # events written per publishing pass, before acks get a turn
HEARTBEAT = 30  # AMQP heartbeat, seconds: ours go out every third of it
PUBLISHER_CONNECTION_NAME = "ws-gateway publisher"
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"

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


def encode_publish(
    channel_id: int, exchange: bytes, event: Event, frame_max: int, queue: str = "", bits: bytes = b"\x00"
) -> bytes:
    """The wire frames of one Basic.Publish: method, content header, body.

    py-amqp builds the same frames through generic, table-driven Python (most of its 60 µs a
    message); every event here has one fixed shape, so it is packed directly. The output is
    checked against what a consumer reads back in tests/test_publisher.py. With `queue`, the
    routing key is that queue's name (for the default exchange) instead of the event's.
    """
    method = b"\x00\x3c\x00\x28\x00\x00" + exchange + shortstr(queue or event.routing_key) + bits
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

    def __init__(self, market_limit: int, backpressure_at: int | None = None, max_read_pause: float = 0.5) -> None:
        self.market: deque[Event] = deque()
        self.private: deque[Event] = deque()
        self.market_limit = market_limit
        self.backpressure_at = backpressure_at if backpressure_at is not None else market_limit
        self.max_read_pause = max_read_pause
        self.dropped = 0
        self.read_pauses = 0

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
    """The publishing connection after the handshake: writes frames, reads confirms."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.paused = False  # TCP write buffer full, or RabbitMQ said connection.blocked
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last_received = time.monotonic()
        self.returning: Return | None = None  # a basic.return whose content header is still to come

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
        for frame in self.reader.feed(data):
            if frame.kind == METHOD_FRAME:
                self.on_method(decode_method(frame.payload))
            elif frame.kind == HEADER_FRAME and self.returning is not None:
                self.publisher.on_return(self.returning, message_id(frame.payload))
                self.returning = None  # its body frames, the only others we get, are skipped
        if self.reader.malformed:
            self.lost("malformed frame from RabbitMQ")

    def on_method(self, method: Method | None) -> None:
        match method:
            case Ack():
                self.publisher.on_ack(method.delivery_tag, method.multiple)
            case Nack():
                self.publisher.on_nack(method.delivery_tag, method.multiple)
            case Return():
                self.returning = method
            case Blocked():
                self.paused = True
                log.warning("publisher.blocked_by_broker")
            case Unblocked():
                self.paused = False
                self.publisher.kick()
            case Close():
                self.lost(f"closed by RabbitMQ: {method.code} {method.text}")


class Publisher:
    """Owns the AMQP connection of the data path; `run()` keeps it up until stopped."""

    def __init__(
        self,
        url: str,
        handoff: Handoff,
        window: int = 2000,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        park_limit: int = PARK_LIMIT,
        on_route_lost: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.handoff = handoff
        self.window = window
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.confirms = Confirms(park_limit=park_limit)
        self.routes = Routes()
        self.on_route_lost = on_route_lost  # after a reconnect or a return: have the queues declared again
        self.reconnects = 0
        self.last_error = ""
        self.throttle = LogThrottle()
        self.protocol: AmqpProtocol | None = None
        self.channel_id = 1
        self.frame_max = 131072
        self.scheduled = False
        self.retry_timer: asyncio.TimerHandle | None = None
        self.retry_timer_at = 0.0
        self.settled_event = asyncio.Event()
        self.handshake: amqp.Connection | None = None

    @property
    def connected(self) -> bool:
        return self.protocol is not None and not self.protocol.closed.done()

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
        log.info(
            "publisher.reconnected" if self.reconnects else "publisher.connected",
            republishing=len(self.confirms.retry),
        )
        if self.reconnects and self.on_route_lost is not None:
            self.on_route_lost()  # a broker that restarted without its definitions has no queues
        self.kick()

    def handshake_blocking(self) -> amqp.Connection:
        conn = connect(self.url, heartbeat=HEARTBEAT, name=PUBLISHER_CONNECTION_NAME)
        channel = declare_events_exchange(conn, conn.channel())
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
        pending = self.confirms.requeue_all()
        self.protocol = None
        log.warning("publisher.connection_lost", error=self.last_error, unconfirmed=len(pending))

    def pump(self) -> None:
        """Write waiting events, up to the confirm window and BATCH per pass: private lanes first."""
        self.scheduled = False
        protocol = self.protocol
        if protocol is None or protocol.paused or protocol.closed.done() or protocol.transport is None:
            return
        confirms = self.confirms
        if self.handoff.private:
            confirms.fan_out(self.handoff.private, self.routes)
        room = min(BATCH, self.window - len(confirms.unconfirmed))
        channel_id, exchange, frame_max = self.channel_id, shortstr(EXCHANGE), self.frame_max
        frames = []
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
            frames += [encode_publish(channel_id, exchange, event, frame_max) for event in events]
            confirms.sent(events)
        if frames:
            protocol.transport.write(b"".join(frames))
            if len(frames) == BATCH:
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
