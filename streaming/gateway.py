"""The gateway process: composes the sockets, publisher, reconciler, market state and lease.

The event loop runs the sockets, the publisher (RabbitMQ data path), the reconciler, the
status record, the ownership lease, the last-value cache and the balance writer. Two helper
threads stay off the hot path: one I/O thread (database and queue declarations, one call at
a time) and the nudge listener (RabbitMQ control messages from the API). The per-frame path
is `on_frame`: parse once, hand events to the publisher, return; no I/O, no log per frame.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from django.conf import settings
from psycopg.conninfo import make_conninfo

from streaming.balances import BalanceWriter
from streaming.bybit import PUBLIC_CATEGORIES, BybitSocket, SocketConfig, endpoints
from streaming.bybitrest import BybitRest
from streaming.circuit import Breakers, ConnectionBudget
from streaming.envelope import SKIPPED, ControlReply, DataFrame, Envelopes, Malformed, now_ms
from streaming.lock import Lease, OwnerLock, wait_or_timeout
from streaming.marketstate import LastValueCache, MarketState
from streaming.publisher import Handoff, Pacing, Publisher
from streaming.reconciler import PRIVATE, Reconciler
from streaming.recovery import Recovery
from streaming.status import Counters, StatusWriter, status_record
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

SHUTDOWN_BUDGET = 9.0  # seconds from SIGTERM to exit, leaving a margin under 10
MARKET_STATE_CLASSES = frozenset(("orderbook", "ticker", "trade", "balance", "order", "position"))
OVERSIZED = Malformed("oversized frame")
NOT_SUBSCRIBED = Malformed("topic not subscribed on this socket")
RESYNC_EVERY_MS = 5_000  # a book resynced because the gateway was far behind is not resynced again sooner


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
    redeclare_interval: float
    park_limit: int
    backfill_overlap_ms: int
    backfill_first_window_ms: int
    handover_flush: float
    handoff_size: int
    conflate_at: int
    conflate_interval_ms: int
    conflate_max_interval_ms: int
    lag_limit_ms: int
    consumer_backlog: int
    shed_lag_ms: int
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
                auth_retry_cap=s.GATEWAY_AUTH_RETRY_CAP,
                max_frame_bytes=s.GATEWAY_MAX_FRAME_BYTES,
                reply_timeout=s.GATEWAY_REPLY_TIMEOUT,
            ),
            circuit_failures=s.GATEWAY_CIRCUIT_FAILURES,
            circuit_window=s.GATEWAY_CIRCUIT_WINDOW,
            circuit_cooldown=s.GATEWAY_CIRCUIT_COOLDOWN,
            reconcile_interval=s.GATEWAY_RECONCILE_INTERVAL,
            redeclare_interval=s.GATEWAY_REDECLARE_INTERVAL,
            park_limit=s.GATEWAY_PARK_LIMIT,
            backfill_overlap_ms=s.GATEWAY_BACKFILL_OVERLAP_MS,
            backfill_first_window_ms=s.GATEWAY_BACKFILL_FIRST_WINDOW_S * 1000,
            handover_flush=s.GATEWAY_HANDOVER_FLUSH_S,
            handoff_size=s.GATEWAY_HANDOFF_SIZE,
            conflate_at=s.GATEWAY_CONFLATE_AT,
            conflate_interval_ms=s.GATEWAY_CONFLATE_INTERVAL_MS,
            conflate_max_interval_ms=s.GATEWAY_CONFLATE_MAX_INTERVAL_MS,
            lag_limit_ms=s.GATEWAY_LAG_LIMIT_MS,
            consumer_backlog=s.GATEWAY_CONSUMER_BACKLOG,
            shed_lag_ms=s.GATEWAY_SHED_LAG_MS,
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

    @property
    def epoch_key(self) -> str:
        return f"{self.redis_prefix}gateway:epoch"


# OPTIONS keys Django's PostgreSQL backend takes for itself; every other one is a libpq parameter.
DJANGO_ONLY_OPTIONS = frozenset(("assume_role", "isolation_level", "pool", "server_side_binding", "cursor_factory",
                                 "prepare_threshold", "context"))  # fmt: skip


def database_conninfo(db: dict[str, Any]) -> str:
    """A libpq connection string from Django's database settings, OPTIONS (sslmode, connect_timeout, ...) included."""
    options = {key: value for key, value in (db.get("OPTIONS") or {}).items() if key not in DJANGO_ONLY_OPTIONS}
    return make_conninfo(
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        dbname=db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        **options,
    )


async def release_held(handoff: Handoff, publisher: Publisher, stop: asyncio.Event) -> None:
    """While the gateway reads late, queue each held book and ticker that stayed quiet past its topic's slot."""
    while not stop.is_set():
        await wait_or_timeout(stop, handoff.pacing.base_ms / 2000)
        now = now_ms()
        handoff.pacing.ease(now)
        if handoff.held and handoff.release(now):
            publisher.kick()


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        pacing = Pacing(config.lag_limit_ms, config.conflate_interval_ms, config.conflate_max_interval_ms)
        self.handoff = Handoff(config.handoff_size, config.backpressure_at, config.max_read_pause, config.conflate_at,
                               pacing=pacing)  # fmt: skip
        self.publisher = Publisher(
            config.rabbitmq_url,
            self.handoff,
            window=config.confirm_window,
            healthy_after=config.socket.healthy_after,
            park_limit=config.park_limit,
        )
        self.redis = aioredis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.lock = OwnerLock(self.redis, config.lock_key, config.epoch_key, config.lock_ttl)
        self.status_writer = StatusWriter(self.redis, config.status_key, config.status_interval)
        self.cache = LastValueCache(self.redis, config.redis_prefix, config.lvc_book_depth, config.lvc_interval)
        self.balances = BalanceWriter(config.database_conninfo)
        self.market = MarketState(self.cache, self.balances)
        self.envelopes = Envelopes(state=self.market if config.orderbooks else None)
        self.handoff.render, self.handoff.build = self.envelopes.latest, self.envelopes.event
        self.envelopes.lazy = True  # a book or ticker that folds never gets an envelope of its own
        self.reconciler = Reconciler(self, config.reconcile_interval)
        rest = BybitRest.from_settings(settings) if config.credentials else None
        self.recovery = Recovery(self, rest, config.backfill_overlap_ms, config.backfill_first_window_ms)
        self.publisher.on_route_lost = self.reconciler.redeclare
        self.breakers = Breakers(config.circuit_failures, config.circuit_window, config.circuit_cooldown)
        self.budget = ConnectionBudget()
        self.sockets: dict[str, BybitSocket] = {}
        self.socket_tasks: dict[str, asyncio.Task[None]] = {}
        self.throttle = LogThrottle()
        self.stop_event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lease = Lease(self)
        self.state = "starting"
        self.exit_code = 0
        self.started_at = time.time()
        self.counters = Counters()

    def on_frame(self, raw: str | bytes, sock: BybitSocket) -> dict[str, Any] | None:
        """Handle one frame; return it when it is a control reply for the socket."""
        counters = self.counters
        counters.frames_in += 1
        if len(raw) > self.config.socket.max_frame_bytes:
            counters.count_malformed(OVERSIZED, raw, sock.name)
            return None
        frame = self.envelopes.handle(raw, sock.category)
        if type(frame) is not DataFrame:
            if frame is SKIPPED:
                counters.skipped += 1
                return None
            if type(frame) is ControlReply:
                return frame.message
            counters.count_malformed(frame, raw, sock.name)  # type: ignore[arg-type]
            return None
        if frame.topic not in sock.desired and frame.topic not in sock.live:
            counters.count_malformed(NOT_SUBSCRIBED, raw, sock.name)
            return None
        counters.events_out += self.handoff.offer(frame)  # a book or ticker may fold into its newest state
        self.publisher.kick()
        by_key = counters.by_routing_key
        for event in frame.events:  # those published as they are
            by_key[event.routing_key] += 1
        if frame.quarantined:
            counters.count_quarantined(frame, sock.name)
        self.reconciler.seen[(sock.category, frame.topic)] = time.time()
        if frame.event_class in MARKET_STATE_CLASSES and self.market.keep(frame):
            if self.throttle.allow(f"gap:{frame.topic}") is not None:
                log.warning("orderbook.gap", socket=sock.name, topic=frame.topic, trace_id=frame.trace_id)
            sock.resubscribe(frame.topic)
        elif frame.event_class == "orderbook" and self.handoff.pacing.behind and self.config.shed_lag_ms:
            self.shed(frame, sock)
        return None

    def shed(self, frame: DataFrame, sock: BybitSocket) -> None:
        """Far behind on a book (a delta read `shed_lag_ms` later than usual): resync it from a snapshot.

        Seconds behind, reading and applying every delta of the backlog costs more CPU than the
        gateway has, so the delay only grows. Instead the topic is subscribed again, and until
        its snapshot comes its deltas are parsed and dropped (OrderBook.apply, Envelopes): the
        backlog goes by for the cost of parsing it, and the book is whole and fresh again.
        """
        behind_ms = self.handoff.pacing.above_usual(frame.received_ts, frame.parsed.get("ts"))
        book = self.market.books.get((sock.category, frame.topic))
        if behind_ms <= self.config.shed_lag_ms or book is None or not book.consistent or frame.topic not in sock.live:
            return
        if frame.received_ts - book.shed_at < RESYNC_EVERY_MS:
            return
        book.consistent, book.shedding, book.shed_at = False, True, frame.received_ts
        self.counters.resyncs += 1
        if self.throttle.allow("resync_behind") is not None:
            log.warning("orderbook.resync_behind", socket=sock.name, topic=frame.topic, behind_ms=behind_ms)
        sock.resubscribe(frame.topic)

    def open_socket(self, name: str, category: str) -> BybitSocket:
        private = category == PRIVATE
        url = self.config.private_url if private else f"{self.config.public_base}/{category}"
        sock = BybitSocket(
            name,
            url,
            category,
            self.config.socket,
            self.breakers[url],  # the endpoint's own: failures of one path never delay another
            self.budget,
            on_frame=self.on_frame,
            on_ack=self.reconciler.topics_confirmed,
            on_reject=self.reconciler.topic_rejected,
            credentials=self.config.credentials if private else None,
            # Market backlog pauses market reads only: private events are never held up by it.
            backpressure=None if private else (self.handoff.backlogged, self.handoff.relieve),
        )
        self.sockets[name] = sock
        self.socket_tasks[name] = self.start(sock.run(), f"socket-{name}")
        log.info("gateway.socket_opened", socket=name, url=url)
        return sock

    async def close_socket(self, name: str) -> None:
        sock = self.sockets.pop(name)
        task = self.socket_tasks.pop(name)
        await sock.stop()
        await asyncio.wait({task}, timeout=2)
        log.info("gateway.socket_closed", socket=name)

    def start(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run a socket or loop task; those only end when stopped, so an exception stops the gateway."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self.task_done)
        return task

    def task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("gateway.task_crashed", task=task.get_name(), exc_info=task.exception())
        self.exit_code = 1
        self.stop_event.set()

    def nudge(self) -> None:
        """Thread-safe: ask for a reconciliation now."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.reconciler.nudged.set)

    def status(self) -> dict[str, Any]:
        return status_record(self)

    def private_socket(self) -> BybitSocket | None:
        return next((s for s in self.sockets.values() if s.category == PRIVATE), None)

    async def run(self) -> int:
        """Serve until `stop_event` is set; return the process exit code."""
        self.loop = asyncio.get_running_loop()
        self.state = "standby"
        if not await self.lock.wait(self.stop_event):
            await self.redis.aclose()
            return 0
        self.envelopes.epoch = self.lock.epoch
        await self.recovery.load(self.redis)
        self.state = "running"
        publisher_stop = asyncio.Event()
        self.lease.publishing = publishing = self.start(self.publisher.run(publisher_stop), "publisher")
        self.reconciler.listen()
        private = self.config.private_url if self.config.credentials else None
        log.info("gateway.started", public=self.config.public_base, private=private, categories=list(PUBLIC_CATEGORIES))
        stop = self.stop_event
        loops = [
            self.start(self.reconciler.run(stop), "reconcile"),
            self.start(self.status_writer.run(self, stop), "status"),
            self.start(self.lease.keep(), "lock"),
            self.start(self.recovery.run(stop), "recovery"),
            self.start(self.recovery.keep_watermark(self.redis, stop, self.config.status_interval), "watermark"),
            self.start(release_held(self.handoff, self.publisher, stop), "conflation"),
        ]
        if self.config.consumer_backlog:
            loops.append(self.start(self.reconciler.watch_backlog(stop, self.config.consumer_backlog), "backlog"))
        writers = [
            self.start(self.cache.run(stop, self.handoff.pacing), "lvc"),
            self.start(self.balances.run(stop), "balances"),
        ]
        await stop.wait()
        return await self.shutdown(loops, writers, publishing, publisher_stop)

    async def shutdown(
        self,
        loops: list[asyncio.Task[Any]],
        writers: list[asyncio.Task[Any]],
        publishing: asyncio.Task[Any],
        publisher_stop: asyncio.Event,
    ) -> int:
        """Stop reading, confirm what was read, release the lock: within SHUTDOWN_BUDGET seconds."""
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        self.state = "stopping"
        log.info("gateway.stopping", in_flight=self.publisher.in_flight, handoff_depth=len(self.handoff))
        for task in loops:
            task.cancel()
        await asyncio.wait(writers, timeout=2)  # they end on stop_event after a last flush
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.gather(*(self.close_socket(name) for name in list(self.sockets)), return_exceptions=True)
        flushed = await self.lease.flush(deadline)
        publisher_stop.set()
        self.publisher.close()
        await asyncio.wait({publishing}, timeout=0.5)
        publishing.cancel()
        await self.reconciler.finish(max(0.1, deadline - time.monotonic() - 0.3))
        self.state = "stopped"
        if not self.lock.released and self.exit_code != 3:  # else the lock and the status record are the next owner's
            await self.lease.hand_over()
        await self.redis.aclose()
        await self.recovery.close()
        self.reconciler.close()
        if not flushed:
            log.error(
                "gateway.stopped_with_unconfirmed_events",
                in_flight=self.publisher.in_flight,
                handoff_depth=len(self.handoff),
            )
            return self.exit_code or 1
        log.info("gateway.stopped", published=self.publisher.published, confirmed=self.publisher.confirmed)
        return self.exit_code


async def main() -> int:
    gateway = Gateway(GatewayConfig.from_settings())
    # What exists now (Django, the libraries, the gateway's own parts) lives as long as the process.
    # Frozen, the collector no longer walks it: a full collection took 45-130 ms with it (bench
    # (e)), every frame on every socket waiting meanwhile.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop_event.set)
    return await gateway.run()
