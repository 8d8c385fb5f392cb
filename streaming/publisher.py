"""The RabbitMQ publisher: a thread with one py-amqp channel, publisher confirms pipelined.

Socket readers never wait on RabbitMQ: they put events into a `Handoff`, and the publisher
thread drains it. Confirms are pipelined (perf-notes.md: waiting for each ack is 8x slower):
up to `window` events are in flight, and each stays in `unconfirmed` until RabbitMQ acks it.
When the connection is lost, every unconfirmed event is re-published first after reconnecting,
so consumers may see a duplicate `id` but never a gap (at-least-once).
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import amqp
import structlog

from streaming.envelope import Event
from subscriptions.topics import EXCHANGE
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

BATCH = 256  # events published between two looks at the acks
IDLE_WAIT = 0.05  # seconds the thread sleeps when there is nothing to do
NACK_RETRY_DELAY = 1.0  # seconds before a nacked private event is published again
HEARTBEAT = 30  # AMQP heartbeat, seconds
PUBLISHER_CONNECTION_NAME = "ws-gateway publisher"

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
    """Bounded hand-off from the socket readers (event loop) to the publisher thread.

    Market data is bounded: when full, the oldest market event is dropped and counted.
    Private events are never dropped: they queue without bound (and the depth shows in
    health), because a lost order update costs more than memory.
    """

    def __init__(self, market_limit: int) -> None:
        self.market: deque[Event] = deque()
        self.private: deque[Event] = deque()
        self.market_limit = market_limit
        self.dropped = 0
        self.idle = False
        self.wakeup = threading.Event()

    def put(self, event: Event) -> None:
        if event.private:
            self.private.append(event)
        else:
            if len(self.market) >= self.market_limit:
                try:
                    self.market.popleft()
                    self.dropped += 1
                except IndexError:  # the publisher emptied it meanwhile
                    pass
            self.market.append(event)
        if self.idle:
            self.wakeup.set()

    def take(self) -> Event | None:
        """Return the next event, private ones first, or None."""
        try:
            return self.private.popleft()
        except IndexError:
            pass
        try:
            return self.market.popleft()
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self.market) + len(self.private)

    def wait(self, timeout: float) -> None:
        """Sleep until an event arrives or `timeout` passes."""
        self.idle = True
        if not len(self):
            self.wakeup.wait(timeout)
        self.idle = False
        self.wakeup.clear()


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


class Publisher:
    """Owns the AMQP connection of the data path; run() is the thread's body."""

    def __init__(
        self,
        url: str,
        handoff: Handoff,
        window: int = 2000,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        on_event_published: Callable[[Event], None] | None = None,
    ) -> None:
        self.url = url
        self.handoff = handoff
        self.window = window
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.unconfirmed: dict[int, Event] = {}  # delivery tag -> event, in publish order
        self.retry: deque[Event] = deque()  # re-published before anything new
        self.nacked: deque[tuple[float, Event]] = deque()
        self.next_tag = 1
        self.published = 0
        self.confirmed = 0
        self.republished = 0
        self.nacks = 0
        self.market_nack_drops = 0
        self.reconnects = 0
        self.connected = False
        self.last_error = ""
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.throttle = LogThrottle()
        self.conn: amqp.Connection | None = None
        self.channel: amqp.Channel | None = None

    @property
    def in_flight(self) -> int:
        return len(self.unconfirmed) + len(self.retry) + len(self.nacked)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="publisher", daemon=True)
        self.thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask the thread to flush and stop; return True if everything was confirmed in time."""
        self.stopping.set()
        self.handoff.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout)
        return self.in_flight == 0 and len(self.handoff) == 0

    def run(self) -> None:
        attempt = 0
        while True:
            try:
                self.open()
                attempt = 0
                self.pump()
                self.close()
                return
            except (TimeoutError, OSError, amqp.exceptions.AMQPError) as exc:
                self.connection_lost(exc)
            if self.stopping.is_set() and not self.in_flight and not len(self.handoff):
                return
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))
            attempt += 1
            log.warning(
                "publisher.reconnecting", delay=round(delay, 3), error=self.last_error, in_flight=self.in_flight
            )
            # A stop request does not cut the wait short: unconfirmed events still need a broker.
            time.sleep(delay)

    def open(self) -> None:
        self.conn = connect(self.url, heartbeat=HEARTBEAT, name=PUBLISHER_CONNECTION_NAME)
        self.channel = self.conn.channel()
        self.channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
        self.channel.events["basic_ack"].add(self.on_ack)
        self.channel.events["basic_nack"].add(self.on_nack)
        self.channel.confirm_select()
        self.next_tag = 1
        self.connected = True
        if self.reconnects:
            log.info("publisher.reconnected", republishing=len(self.retry))
        else:
            log.info("publisher.connected")

    def close(self) -> None:
        self.connected = False
        if self.conn is not None:
            try:
                self.conn.close()
            except (OSError, amqp.exceptions.AMQPError):
                pass
        self.conn = self.channel = None

    def connection_lost(self, exc: BaseException) -> None:
        """Queue every unconfirmed event for re-publishing, oldest first."""
        self.connected = False
        self.reconnects += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        pending = list(self.unconfirmed.values())
        self.unconfirmed.clear()
        self.retry.extendleft(reversed(pending))
        log.warning("publisher.connection_lost", error=self.last_error, unconfirmed=len(pending))
        if self.conn is not None:
            try:
                self.conn.collect()
            except Exception:  # noqa: BLE001 - the connection is already gone; free what is left
                pass
        self.conn = self.channel = None

    def pump(self) -> None:
        """Publish and collect confirms until asked to stop and nothing is left in flight."""
        assert self.conn is not None and self.channel is not None
        conn, sock = self.conn, self.conn.transport.sock
        last_tick = time.monotonic()
        while True:
            sent = self.publish_some()
            self.collect_acks(sock, 0)
            now = time.monotonic()
            if now - last_tick > 1.0:
                conn.heartbeat_tick()
                last_tick = now
            if sent:
                continue
            if self.stopping.is_set() and not self.in_flight and not len(self.handoff):
                return
            if self.unconfirmed or self.nacked:
                self.collect_acks(sock, IDLE_WAIT)
            else:
                self.handoff.wait(IDLE_WAIT)

    def publish_some(self) -> int:
        assert self.conn is not None and self.channel is not None
        channel_id, frame_max = self.channel.channel_id, self.conn.frame_max
        exchange = shortstr(EXCHANGE)
        frames: list[bytes] = []
        sent = 0
        if self.nacked and self.nacked[0][0] <= time.monotonic():
            self.retry.append(self.nacked.popleft()[1])
        while sent < BATCH and len(self.unconfirmed) < self.window:
            if self.retry:
                event = self.retry.popleft()
                self.republished += 1
            else:
                event = self.handoff.take()
                if event is None:
                    break
            frames.append(encode_publish(channel_id, exchange, event, frame_max))
            self.unconfirmed[self.next_tag] = event
            self.next_tag += 1
            self.published += 1
            sent += 1
        if frames:
            # One write per batch; the channel's state machine is not involved in publishing.
            self.conn.transport.write(b"".join(frames))
        return sent

    def collect_acks(self, sock: socket.socket, timeout: float) -> None:
        """Process every confirm that has arrived; wait up to `timeout` for the first."""
        assert self.conn is not None
        must_wait = len(self.unconfirmed) >= self.window
        while True:
            readable = self.conn.transport._read_buffer or select.select([sock], [], [], timeout)[0]
            if not readable:
                if not must_wait:
                    return
                # The window is full: RabbitMQ is slow or blocked; wait for it, not spin.
                self.conn.heartbeat_tick()
                timeout = 1.0
                continue
            try:
                self.conn.drain_events(timeout=max(timeout, 1.0))
            except TimeoutError:
                pass  # only a heartbeat arrived: nothing to settle, the connection is fine
            timeout = 0
            must_wait = len(self.unconfirmed) >= self.window

    def on_ack(self, delivery_tag: int, multiple: bool) -> None:
        for tag in self.settled(delivery_tag, multiple):
            self.unconfirmed.pop(tag)
            self.confirmed += 1

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

    def settled(self, delivery_tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [delivery_tag] if delivery_tag in self.unconfirmed else []
        tags = []
        for tag in self.unconfirmed:  # insertion order is tag order
            if tag > delivery_tag:
                break
            tags.append(tag)
        return tags
