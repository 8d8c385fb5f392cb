"""The gateway: owns the Bybit sockets, the publisher and the reconciler, and their shutdown.

The event loop runs the sockets, the publisher (RabbitMQ data path), reconciliation, status,
the last-value cache and the balance writer. Two helper threads stay off the hot path: one
I/O thread (database and queue declarations, one call at a time) and the nudge listener
(RabbitMQ control messages from the API). The per-frame path is `on_frame`: parse once, hand
events to the publisher, return; no I/O, no logging per frame.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import amqp
import orjson
import redis.asyncio as aioredis
import structlog
from django.conf import settings
from django.db import DatabaseError, connection
from psycopg.conninfo import make_conninfo

from streaming import reconciler
from streaming.balances import BalanceWriter, rows_from_wallet
from streaming.bybit import PUBLIC_CATEGORIES, BybitSocket, SocketConfig, endpoints
from streaming.circuit import CircuitBreaker, ConnectionBudget, backoff_delay
from streaming.envelope import Envelopes, Frame
from streaming.lock import OwnerLock
from streaming.lvc import LastValueCache
from streaming.orderbook import Books
from streaming.publisher import Handoff, Publisher, connect
from streaming.tickers import Tickers
from subscriptions.topics import CONTROL_EXCHANGE, CONTROL_ROUTING_KEY
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

T = TypeVar("T")
SHUTDOWN_BUDGET = 9.0  # seconds from SIGTERM to exit, leaving a margin under 10
LAST_EVENT_FLUSH_INTERVAL = 10.0  # seconds between `last_event_at` writes
SAMPLE_CHARS = 200  # of a malformed frame, in its log line
MARKET_STATE_CLASSES = frozenset(("orderbook", "ticker", "trade", "balance"))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    rabbitmq_url: str
    redis_url: str
    redis_prefix: str
    public_base: str
    private_url: str
    credentials: tuple[str, str] | None
    socket: SocketConfig
    circuit_failures: int
    circuit_window: float
    circuit_cooldown: float
    reconcile_interval: float
    handoff_size: int
    confirm_window: int
    lock_ttl: float
    status_interval: float
    backpressure_at: int
    max_read_pause: float
    orderbooks: bool
    lvc_book_depth: int
    lvc_interval: float
    database_conninfo: str

    @classmethod
    def from_settings(cls) -> GatewayConfig:
        s = settings
        public_base, private_url = endpoints(s.BYBIT_ENVIRONMENT, s.BYBIT_WS_URL, (s.SIMULATOR_HOST, s.SIMULATOR_PORT))
        credentials = (s.BYBIT_API_KEY, s.BYBIT_API_SECRET) if s.BYBIT_API_KEY else None
        return cls(
            rabbitmq_url=s.RABBITMQ_URL,
            redis_url=s.REDIS_URL,
            redis_prefix=s.REDIS_KEY_PREFIX,
            public_base=public_base,
            private_url=private_url,
            credentials=credentials,
            socket=SocketConfig(
                ping_interval=s.GATEWAY_PING_INTERVAL,
                dead_after=s.GATEWAY_DEAD_AFTER,
                connect_timeout=s.GATEWAY_CONNECT_TIMEOUT,
                backoff_base=s.GATEWAY_BACKOFF_BASE,
                backoff_cap=s.GATEWAY_BACKOFF_CAP,
                healthy_after=s.GATEWAY_HEALTHY_AFTER,
                auth_retry=s.GATEWAY_CIRCUIT_COOLDOWN,
                max_frame_bytes=s.GATEWAY_MAX_FRAME_BYTES,
            ),
            circuit_failures=s.GATEWAY_CIRCUIT_FAILURES,
            circuit_window=s.GATEWAY_CIRCUIT_WINDOW,
            circuit_cooldown=s.GATEWAY_CIRCUIT_COOLDOWN,
            reconcile_interval=s.GATEWAY_RECONCILE_INTERVAL,
            handoff_size=s.GATEWAY_HANDOFF_SIZE,
            confirm_window=s.GATEWAY_CONFIRM_WINDOW,
            lock_ttl=s.GATEWAY_LOCK_TTL,
            status_interval=s.GATEWAY_STATUS_INTERVAL,
            backpressure_at=s.GATEWAY_BACKPRESSURE_AT,
            max_read_pause=s.GATEWAY_MAX_READ_PAUSE,
            orderbooks=s.GATEWAY_ORDERBOOKS,
            lvc_book_depth=s.LVC_BOOK_DEPTH,
            lvc_interval=s.LVC_FLUSH_INTERVAL_MS / 1000,
            database_conninfo=database_conninfo(s.DATABASES["default"]),
        )

    @property
    def status_key(self) -> str:
        return f"{self.redis_prefix}gateway:status"

    @property
    def lock_key(self) -> str:
        return f"{self.redis_prefix}gateway:lock"


def database_conninfo(db: dict[str, Any]) -> str:
    """A libpq connection string from Django's database settings."""
    return make_conninfo(
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        dbname=db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
    )


class NudgeListener:
    """Consumes the API's `subscriptions.changed` messages and calls `on_nudge` for each."""

    def __init__(self, url: str, on_nudge: Callable[[], None]) -> None:
        self.url = url
        self.on_nudge = on_nudge
        self.stopping = threading.Event()
        self.connected = False
        self.thread = threading.Thread(target=self.run, name="nudges", daemon=True)

    def run(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                conn = connect(self.url, name="ws-gateway nudges")
                channel = conn.channel()
                channel.exchange_declare(CONTROL_EXCHANGE, "topic", durable=True, auto_delete=False)
                queue = channel.queue_declare("", exclusive=True, auto_delete=True).queue
                channel.queue_bind(queue, CONTROL_EXCHANGE, CONTROL_ROUTING_KEY)
                channel.basic_consume(queue, callback=lambda _message: self.on_nudge(), no_ack=True)
                self.connected, attempt = True, 0
                self.on_nudge()  # nudges sent while we were away are lost: reconcile now
                while not self.stopping.is_set():
                    try:
                        conn.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass
                conn.close()
            except (OSError, amqp.exceptions.AMQPError) as exc:
                self.connected = False
                delay = backoff_delay(attempt, 0.5, 10.0)
                attempt += 1
                log.warning("gateway.nudges_disconnected", error=f"{type(exc).__name__}: {exc}"[:200], retry_in=delay)
                self.stopping.wait(delay)
        self.connected = False


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.handoff = Handoff(config.handoff_size)
        self.publisher = Publisher(config.rabbitmq_url, self.handoff, window=config.confirm_window)
        self.books = Books() if config.orderbooks else None
        self.tickers = Tickers() if config.orderbooks else None
        self.envelopes = Envelopes(books=self.books, tickers=self.tickers)
        self.bindings = reconciler.Bindings(config.rabbitmq_url)
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-io")
        self.redis = aioredis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.lock = OwnerLock(self.redis, config.lock_key, config.lock_ttl)
        self.lvc = LastValueCache(self.redis, config.redis_prefix, config.lvc_book_depth, config.lvc_interval)
        self.balances = BalanceWriter(config.database_conninfo)
        self.book_repairs = 0
        self.breaker = CircuitBreaker(config.circuit_failures, config.circuit_window, config.circuit_cooldown)
        self.budget = ConnectionBudget()
        self.sockets: dict[str, BybitSocket] = {}
        self.socket_tasks: dict[str, asyncio.Task[None]] = {}
        self.rejected: dict[tuple[str, str], str] = {}  # (socket category, topic) -> Bybit's ret_msg
        self.seen: dict[tuple[str, str], float] = {}  # (socket category, topic) -> last event time
        self.background: set[asyncio.Task[Any]] = set()
        self.throttle = LogThrottle()
        self.nudged = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.nudges: NudgeListener | None = None
        self.state = "starting"
        self.exit_code = 0
        self.started_at = time.time()
        self.last_events_flushed = 0.0
        self.frames_in = 0
        self.events_out = 0
        self.malformed = 0
        self.malformed_by_reason: dict[str, int] = defaultdict(int)
        self.by_routing_key: dict[str, int] = defaultdict(int)  # for the monitors' overflow estimate
        self.read_pauses = 0

    # The per-frame path.

    def on_frame(self, raw: str | bytes, sock: BybitSocket) -> dict[str, Any] | None:
        """Handle one frame; return it when it is a control reply for the socket."""
        self.frames_in += 1
        if len(raw) > self.config.socket.max_frame_bytes:
            self.count_malformed(Frame(malformed="oversized frame"), raw, sock)
            return None
        frame = self.envelopes.handle(raw, sock.category)
        if frame.control is not None:
            return frame.control
        if frame.malformed:
            self.count_malformed(frame, raw, sock)
            return None
        if frame.topic not in sock.desired and frame.topic not in sock.live:
            self.count_malformed(Frame(malformed="topic not subscribed on this socket"), raw, sock)
            return None
        put, by_key = self.handoff.put, self.by_routing_key
        for event in frame.events:
            put(event)
            by_key[event.routing_key] += 1
        self.publisher.kick()
        self.events_out += len(frame.events)
        self.seen[(sock.category, frame.topic)] = time.time()
        if frame.event_class in MARKET_STATE_CLASSES:
            self.keep_state(frame, sock)
        return None

    def keep_state(self, frame: Frame, sock: BybitSocket) -> None:
        """Last values for the cache, book repairs, balances: the few frames that need more."""
        msg = frame.parsed
        assert msg is not None
        ts = msg.get("ts")
        if frame.event_class == "orderbook" and self.books is not None:
            book = self.books.get(frame.category, frame.topic)
            if book is not None:
                self.lvc.book(frame.category, frame.symbol, int(frame.param), book, ts)
            if frame.gap:
                self.book_repairs += 1
                if self.throttle.allow(f"gap:{frame.topic}") is not None:
                    log.warning("orderbook.gap", socket=sock.name, topic=frame.topic, trace_id=frame.events[0].trace_id)
                sock.resubscribe(frame.topic)
        elif frame.event_class == "ticker" and frame.merged is not None:
            self.lvc.ticker(frame.category, frame.symbol, frame.merged, ts)
        elif frame.event_class == "trade" and isinstance(msg.get("data"), list) and msg["data"]:
            self.lvc.trade(frame.category, frame.symbol, msg["data"][-1], ts)
        elif frame.event_class == "balance":
            for item in msg["data"]:
                for row in rows_from_wallet(item, msg.get("creationTime") or int(time.time() * 1000)):
                    self.balances.offer(row)

    def backlogged(self) -> bool:
        return len(self.handoff.market) > self.config.backpressure_at

    async def relieve(self) -> None:
        """Pause reading until the publisher has halved the backlog, for `max_read_pause` s at most.

        While the readers wait, the loop runs the publisher and reads RabbitMQ's acks, and TCP
        tells the exchange to slow down. Only if the backlog outlasts the pause does the
        hand-off start dropping the oldest market events.
        """
        self.read_pauses += 1
        deadline = time.monotonic() + self.config.max_read_pause
        target = self.config.backpressure_at // 2
        while len(self.handoff.market) > target and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    def count_malformed(self, frame: Frame, raw: str | bytes, sock: BybitSocket) -> None:
        self.malformed += 1
        self.malformed_by_reason[frame.malformed] += 1
        suppressed = self.throttle.allow(f"malformed:{frame.malformed}")
        if suppressed is not None:
            sample = raw[:SAMPLE_CHARS] if isinstance(raw, str) else repr(raw[:SAMPLE_CHARS])
            log.warning(
                "bybit.malformed_frame",
                socket=sock.name,
                reason=frame.malformed,
                size=len(raw),
                sample=sample,
                suppressed=suppressed,
            )

    # Sockets.

    def open_socket(self, name: str, category: str) -> BybitSocket:
        url = self.config.private_url if category == reconciler.PRIVATE else f"{self.config.public_base}/{category}"
        sock = BybitSocket(
            name,
            url,
            category,
            self.config.socket,
            self.breaker,
            self.budget,
            on_frame=self.on_frame,
            on_ack=self.on_ack,
            on_reject=self.on_reject,
            credentials=self.config.credentials if category == reconciler.PRIVATE else None,
            backpressure=(self.backlogged, self.relieve),
        )
        self.sockets[name] = sock
        task = asyncio.create_task(sock.run(), name=f"socket-{name}")
        task.add_done_callback(self.task_done)
        self.socket_tasks[name] = task
        log.info("gateway.socket_opened", socket=name, url=url)
        return sock

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """Sockets and loops only end when stopped; an exception is a bug: stop loudly."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("gateway.task_crashed", task=task.get_name(), exc_info=task.exception())
        self.exit_code = 1
        self.stop_event.set()

    async def close_socket(self, name: str) -> None:
        sock = self.sockets.pop(name)
        task = self.socket_tasks.pop(name)
        await sock.stop()
        await asyncio.wait({task}, timeout=2)
        log.info("gateway.socket_closed", socket=name)

    def on_ack(self, sock: BybitSocket, topics: list[str]) -> None:
        log.info("bybit.subscribed", socket=sock.name, topics=len(topics), first=topics[0])
        self.in_background(reconciler.mark_active, sock.category, topics)

    def on_reject(self, sock: BybitSocket, topic: str, message: str) -> None:
        """Bybit refused a topic (or, with topic "*", the credentials): fail its rows."""
        log.warning("bybit.subscribe_rejected", socket=sock.name, topic=topic, ret_msg=message)
        key = (sock.category, topic)
        self.rejected[key] = message
        task = self.in_background(reconciler.mark_failed, sock.category, None if topic == "*" else [topic], message)
        task.add_done_callback(lambda _t: self.rejected.pop(key, None))

    # Background work.

    async def in_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database/AMQP work on the single I/O thread."""
        assert self.loop is not None
        return await self.loop.run_in_executor(self.io, fn, *args)

    def in_background(self, fn: Callable[..., Any], *args: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(self.in_io(fn, *args))
        self.background.add(task)
        task.add_done_callback(self.background_done)
        return task

    def background_done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("gateway.background_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    def nudge(self) -> None:
        """Thread-safe: ask for a reconciliation now."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.nudged.set)

    # Reconciliation.

    async def reconcile_once(self) -> None:
        """Make the sockets' topics and the queue bindings equal to the live subscriptions."""
        rows = await self.in_io(reconciler.load_live_rows)
        if self.config.credentials is None and any(r.socket_category == reconciler.PRIVATE for r in rows):
            message = "private streams need BYBIT_API_KEY and BYBIT_API_SECRET"
            failed = await self.in_io(reconciler.mark_failed, reconciler.PRIVATE, None, message)
            log.error("gateway.private_without_credentials", failed_subscriptions=failed)
            rows = [r for r in rows if r.socket_category != reconciler.PRIVATE]
        await self.in_io(self.bindings.ensure, rows)

        wanted: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            if (row.socket_category, row.bybit_topic) not in self.rejected:
                wanted[row.socket_category].add(row.bybit_topic)
        current = {name: (s.category, set(s.desired)) for name, s in self.sockets.items()}
        plan = reconciler.assign(wanted, current)
        for name, (category, topics) in plan.items():
            sock = self.sockets.get(name) or self.open_socket(name, category)
            if sock.desired != topics:
                self.forget_state(category, sock.desired - topics)
                sock.want(topics)
        for name in [n for n in self.sockets if n not in plan]:
            self.forget_state(self.sockets[name].category, self.sockets[name].desired)
            await self.close_socket(name)

        # Rows whose topic is already live (a second service, or rows created while we were down).
        live = {(s.category, t) for s in self.sockets.values() for t in s.live}
        pending: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            if row.status == "pending" and (row.socket_category, row.bybit_topic) in live:
                pending[row.socket_category].append(row.bybit_topic)
        for category, topics in pending.items():
            await self.in_io(reconciler.mark_active, category, topics)

        if time.monotonic() - self.last_events_flushed > LAST_EVENT_FLUSH_INTERVAL and self.seen:
            seen, self.seen = self.seen, {}
            self.last_events_flushed = time.monotonic()
            await self.in_io(reconciler.record_last_events, seen)

    def forget_state(self, category: str, topics: set[str]) -> None:
        """Topics the gateway no longer holds: drop their books and cached values."""
        for topic in topics:
            if self.books is not None:
                self.books.forget(category, topic)
            self.lvc.forget(category, topic)

    async def reconcile_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                await self.reconcile_once()
            except (DatabaseError, OSError, amqp.exceptions.AMQPError) as exc:
                suppressed = self.throttle.allow("reconcile")
                if suppressed is not None:
                    log.warning("gateway.reconcile_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            try:
                await asyncio.wait_for(self.nudged.wait(), self.config.reconcile_interval)
            except TimeoutError:
                pass
            self.nudged.clear()

    # Status and ownership.

    def status(self) -> dict[str, Any]:
        publisher = self.publisher
        return {
            "updated_at": time.time(),
            "started_at": self.started_at,
            "state": self.state,
            "circuit": self.breaker.snapshot(),
            "sockets": [s.snapshot() for s in self.sockets.values()],
            "publisher": {
                "connected": publisher.connected,
                "reconnects": publisher.reconnects,
                "last_error": publisher.last_error,
            },
            "nudges_connected": bool(self.nudges and self.nudges.connected),
            "counters": {
                "frames_in": self.frames_in,
                "events": self.events_out,
                "published": publisher.published,
                "confirmed": publisher.confirmed,
                "republished": publisher.republished,
                "nacked": publisher.nacks,
                "dropped": self.handoff.dropped + publisher.market_nack_drops,
                "malformed": self.malformed,
            },
            "malformed_by_reason": dict(self.malformed_by_reason),
            "published_by_routing_key": dict(self.by_routing_key),
            "handoff_depth": len(self.handoff),
            "read_pauses": self.read_pauses,
            "in_flight": publisher.in_flight,
            "rejected_topics": len(self.rejected),
            "books": {
                "kept": len(self.books.books) if self.books else 0,
                "gaps": self.books.gaps if self.books else 0,
                "repairs": self.book_repairs,
            },
            "lvc": {"writes": self.lvc.writes, "errors": self.lvc.errors, "pending": len(self.lvc.dirty)},
            "balances": {
                "pending": len(self.balances.pending),
                "written": self.balances.written,
                "last_error": self.balances.last_error,
            },
        }

    async def write_status(self) -> None:
        record = orjson.dumps(self.status())
        await self.redis.set(self.config.status_key, record, ex=max(60, int(self.config.status_interval * 10)))

    async def status_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                await self.write_status()
            except (aioredis.RedisError, OSError) as exc:
                if self.throttle.allow("status") is not None:
                    log.warning("gateway.status_write_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.config.status_interval)
            except TimeoutError:
                pass

    async def lock_loop(self) -> None:
        """Renew the ownership lock; if another instance holds it now, stop at once."""
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.config.lock_ttl / 3)
            except TimeoutError:
                pass
            try:
                if await self.lock.renew() or await self.lock.acquire():
                    continue
                log.error("gateway.lock_lost", holder=await self.lock.holder())
                self.exit_code = 3
                self.stop_event.set()
            except (aioredis.RedisError, OSError) as exc:
                # Nobody can take the lock while Redis is away; keep serving and retry.
                if self.throttle.allow("lock") is not None:
                    log.warning("gateway.lock_renew_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    async def wait_for_ownership(self) -> bool:
        """Wait as standby until this instance holds the lock; False if stopped first."""
        announced = False
        while not self.stop_event.is_set():
            try:
                if await self.lock.acquire():
                    log.info("gateway.lock_acquired", key=self.config.lock_key)
                    return True
                if not announced:
                    log.info("gateway.standby", holder=await self.lock.holder(), key=self.config.lock_key)
                    announced = True
            except (aioredis.RedisError, OSError) as exc:
                if self.throttle.allow("lock") is not None:
                    log.warning("gateway.lock_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.config.lock_ttl / 5)
            except TimeoutError:
                pass
        return False

    # Lifetime.

    async def run(self) -> int:
        """Serve until `stop_event` is set; return the process exit code."""
        self.loop = asyncio.get_running_loop()
        self.state = "standby"
        if not await self.wait_for_ownership():
            await self.redis.aclose()
            return 0
        self.state = "running"
        publisher_stop = asyncio.Event()
        publishing = asyncio.create_task(self.publisher.run(publisher_stop), name="publisher")
        publishing.add_done_callback(self.task_done)
        self.nudges = NudgeListener(self.config.rabbitmq_url, self.nudge)
        self.nudges.thread.start()
        log.info(
            "gateway.started",
            public=self.config.public_base,
            private=self.config.private_url if self.config.credentials else None,
            categories=list(PUBLIC_CATEGORIES),
        )
        loops = [
            asyncio.create_task(self.reconcile_loop(), name="reconcile"),
            asyncio.create_task(self.status_loop(), name="status"),
            asyncio.create_task(self.lock_loop(), name="lock"),
            asyncio.create_task(self.lvc.run(self.stop_event), name="lvc"),
            asyncio.create_task(self.balances.run(self.stop_event), name="balances"),
        ]
        for task in loops:
            task.add_done_callback(self.task_done)
        await self.stop_event.wait()
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        self.state = "stopping"
        log.info("gateway.stopping", in_flight=self.publisher.in_flight, handoff_depth=len(self.handoff))
        for task in loops[:3]:  # the cache and balance writers end on stop_event after a last flush
            task.cancel()
        await asyncio.wait(loops[3:], timeout=2)
        await asyncio.gather(*loops[:3], return_exceptions=True)
        await asyncio.gather(*(self.close_socket(name) for name in list(self.sockets)), return_exceptions=True)
        flushed = await self.publisher.flush(max(0.5, deadline - time.monotonic() - 0.5))
        publisher_stop.set()
        self.publisher.close()
        await asyncio.wait({publishing}, timeout=0.5)
        publishing.cancel()
        self.nudges.stopping.set()
        await asyncio.to_thread(self.nudges.thread.join, 1.0)
        if self.background:
            await asyncio.wait(self.background, timeout=max(0.1, deadline - time.monotonic() - 0.3))
        self.state = "stopped"
        try:
            await self.write_status()
            if self.exit_code != 3:
                await self.lock.release()
        except (aioredis.RedisError, OSError):
            pass
        await self.redis.aclose()
        self.io.submit(self.bindings.close)
        self.io.submit(close_old_connections_now)
        self.io.shutdown(wait=True)
        if not flushed:
            log.error(
                "gateway.stopped_with_unconfirmed_events",
                in_flight=self.publisher.in_flight,
                handoff_depth=len(self.handoff),
            )
            return self.exit_code or 1
        log.info("gateway.stopped", published=self.publisher.published, confirmed=self.publisher.confirmed)
        return self.exit_code


def close_old_connections_now() -> None:
    """Close the I/O thread's database connection (Django keeps one per thread)."""
    connection.close()


async def main() -> int:
    gateway = Gateway(GatewayConfig.from_settings())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop_event.set)
    return await gateway.run()
