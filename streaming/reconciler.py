"""Desired state -> Bybit and RabbitMQ: the reconcile loop, its nudge listener, queue declarations.

`Reconciler` compares the live subscription rows with the topics on the gateway's sockets and
the queues bound on the exchange, and closes the difference: every few seconds, and at once
when the API nudges. The database and AMQP work is synchronous and runs on the gateway's
single I/O thread, never on the event loop. `assign` is pure: it spreads wanted topics over
sockets within Bybit's per-connection limits, keeping every topic where it already is.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import amqp
import orjson
import structlog
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from streaming.circuit import backoff_delay
from streaming.envelope import now_ms
from streaming.lock import wait_or_timeout
from streaming.protocol import fits
from streaming.publisher import amqp_params, connect, declare_events_exchange
from subscriptions.models import Subscription
from subscriptions.services import (
    subscriptions_mark_active,
    subscriptions_mark_failed,
    subscriptions_record_last_events,
)
from subscriptions.topics import CONTROL_EXCHANGE, CONTROL_ROUTING_KEY, EXCHANGE, PRIVATE_CLASSES
from wsgateway.logging import LogThrottle

if TYPE_CHECKING:
    from streaming.bybit import BybitSocket
    from streaming.gateway import Gateway

log = structlog.get_logger(__name__)

T = TypeVar("T")
PRIVATE = "private"
CANCELLED_LOOKBACK = timedelta(days=1)  # bindings of rows cancelled while the gateway was down
LAST_EVENT_FLUSH_INTERVAL = 10.0  # seconds between `last_event_at` writes
BACKLOG_POLL = 0.2  # seconds between looks at the depth of the services' market queues
BACKLOG_RETRY = 5.0  # seconds before looking again when RabbitMQ did not answer
UNROUTABLE = "ws-gateway.unroutable"  # the events exchange's alternate exchange (fanout), and its queue
# Bounded, and self-emptying: it is there to show what was lost and why, not to keep it forever.
UNROUTABLE_ARGUMENTS = {"x-max-length": 10_000, "x-overflow": "drop-head", "x-message-ttl": 3_600_000}
ALTERNATE_EXCHANGE_POLICY = "ws-gateway-alternate-exchange"


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    service_name: str
    socket_category: str  # a public category, or "private"
    bybit_topic: str
    routing_key: str
    queue_name: str
    event_class: str
    status: str


def load_live_rows() -> list[Row]:
    """Every pending or active subscription."""
    close_old_connections()
    rows = Subscription.objects.filter(status__in=Subscription.LIVE_STATUSES).values_list(
        "id", "service_name", "category", "bybit_topic", "routing_key", "queue_name", "event_class", "status"
    )
    return [Row(str(r[0]), r[1], r[2] or PRIVATE, *r[3:]) for r in rows]


def load_cancelled_bindings() -> set[tuple[str, str]]:
    """(queue, routing key) of rows cancelled recently, to unbind after a restart."""
    since = timezone.now() - CANCELLED_LOOKBACK
    rows = Subscription.objects.filter(status=Subscription.Status.CANCELLED, cancelled_at__gte=since)
    return set(rows.values_list("queue_name", "routing_key"))


def db_category(socket_category: str) -> str:
    """The subscriptions' `category` of a socket's topics: "" for the private socket."""
    return "" if socket_category == PRIVATE else socket_category


def mark_active(ids: list[str]) -> int:
    close_old_connections()
    return subscriptions_mark_active(ids=ids)


def mark_failed(socket_category: str, topics: list[str] | None, message: str) -> int:
    close_old_connections()
    return subscriptions_mark_failed(category=db_category(socket_category), topics=topics, message=message)


def record_last_events(seen: dict[tuple[str, str], float]) -> None:
    close_old_connections()
    subscriptions_record_last_events(seen={(db_category(c), t): ts for (c, t), ts in seen.items()})


def queue_arguments(event_class: str) -> dict[str, Any]:
    """Retention of a `ws-gateway.<service>.<class>` queue.

    Market data drops the oldest message when full (`drop-head`), so a slow consumer gets the
    freshest data; private classes refuse new messages instead (`reject-publish`): RabbitMQ
    nacks the publish and the gateway keeps and retries it, so nothing is lost silently.
    """
    arguments: dict[str, Any] = {}
    limit = settings.QUEUE_MAX_LENGTH.get(event_class, 0)
    if limit:
        arguments["x-max-length"] = limit
    if event_class in PRIVATE_CLASSES:
        arguments["x-overflow"] = "reject-publish"
    else:
        arguments["x-overflow"] = "drop-head"
        if settings.QUEUE_MARKET_TTL_MS:
            arguments["x-message-ttl"] = settings.QUEUE_MARKET_TTL_MS
    return arguments


def alternate_exchange_policy(amqp_url: str, management_url: str, timeout: float = 2.0) -> None:
    """Set the policy giving the events exchange its alternate exchange, through the management API.

    A policy rather than an exchange argument: it applies to an exchange that already exists
    (arguments cannot change), to one an operator deletes and makes again, and it leaves the
    exchange's arguments empty, so every client that declares the exchange plainly keeps
    working. Raises OSError (urllib's errors included) when the API is down or refuses.
    """
    params = amqp_params(amqp_url)
    vhost = quote(str(params["virtual_host"]), safe="")
    credentials = base64.b64encode(f"{params['userid']}:{params['password']}".encode()).decode()
    policy = {
        "pattern": "^" + EXCHANGE.replace(".", "\\.") + "$",
        "apply-to": "exchanges",
        "definition": {"alternate-exchange": UNROUTABLE},
        "priority": 0,
    }
    request = urllib.request.Request(
        f"{management_url.rstrip('/')}/api/policies/{vhost}/{ALTERNATE_EXCHANGE_POLICY}",
        data=orjson.dumps(policy),
        method="PUT",
        headers={"Authorization": f"Basic {credentials}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout):
        pass


def by_symbol(topic: str) -> tuple[str, str]:
    """Sort key: the symbol (a topic's last part), then the topic."""
    return topic.rpartition(".")[2], topic


def assign(wanted: dict[str, set[str]], current: dict[str, tuple[str, set[str]]]) -> dict[str, tuple[str, set[str]]]:
    """Place wanted topics on sockets: `{socket name: (category, topics)}`.

    `current` is the same shape for the sockets that exist. Topics stay where they are; new
    ones go to the first socket of their category with room, else to a new socket named
    `<category>-<n>`. Sockets left with no topics are absent from the result. New topics are
    taken symbol by symbol, so a symbol's book, ticker and trades share a socket and the heavy
    book topics spread over the sockets instead of filling the first one: a socket read behind
    the others then holds a third of the books, not all of them.
    """
    plan: dict[str, tuple[str, set[str]]] = {}
    placed: set[tuple[str, str]] = set()
    for name, (category, topics) in sorted(current.items()):
        keep = topics & wanted.get(category, set())
        plan[name] = (category, keep)
        placed.update((category, t) for t in keep)
    for category in sorted(wanted):
        for topic in sorted(wanted[category], key=by_symbol):
            if (category, topic) in placed:
                continue
            target = next(
                (
                    n
                    for n, (c, ts) in sorted(plan.items())
                    if c == category and (category == PRIVATE or fits(ts, topic))
                ),
                None,
            )
            if target is None:
                index = 1
                while f"{category}-{index}" in plan:
                    index += 1
                target = f"{category}-{index}"
                plan[target] = (category, set())
            plan[target][1].add(topic)
    return {name: entry for name, entry in plan.items() if entry[1]}


class Bindings:
    """Declares service queues and their bindings on a connection of its own.

    Market queues are bound to the events exchange; private queues are only declared, as the
    publisher sends private events to each queue by name. What was declared is remembered so
    that a reconcile round costs nothing, but the memory is dropped (and everything declared
    again, idempotently: about 0.2 s for 500 queues) every `redeclare_interval` seconds, and at
    once after `invalidate()`: a queue or binding deleted by an operator, or lost with a broker
    that came back without its definitions, is back within one reconcile round.
    """

    def __init__(self, url: str, redeclare_interval: float = 30.0) -> None:
        self.url = url
        self.redeclare_interval = redeclare_interval
        self.conn: amqp.Connection | None = None
        self.channel: amqp.Channel | None = None
        self.bound: set[tuple[str, str]] = set()
        self.declared: set[str] = set()  # private and overflow queues
        self.declared_at = 0.0
        self.invalidated = False
        self.policy_set = False
        self.cleaned_after_start = False
        self.throttle = LogThrottle(interval=600.0)

    def invalidate(self) -> None:
        """Thread-safe: declare every queue and binding (and the policy) again on the next `ensure`."""
        self.invalidated = True
        self.policy_set = False

    def ensure(self, rows: list[Row], overflow: list[str] | None = None) -> None:
        """Declare every live row's queue (bound, for market data) and the overflow queues in use; unbind the rest."""
        needed = {(r.queue_name, r.routing_key): r.event_class for r in rows if r.event_class not in PRIVATE_CLASSES}
        private = {r.queue_name: r.event_class for r in rows if r.event_class in PRIVATE_CLASSES}
        try:
            channel = self.open()
            refresh = self.invalidated or time.monotonic() - self.declared_at > self.redeclare_interval
            if refresh:
                if self.invalidated:
                    log.info("queue.declaring_again", queues=len(private) + len({q for q, _ in needed}))
                self.invalidated = False
                self.declared_at = time.monotonic()
                channel = self.declare_exchanges(channel)
                self.declared.clear()
            for queue, event_class in private.items():
                if queue not in self.declared:
                    channel = self.declare(channel, queue, event_class)
                    self.declared.add(queue)
            for queue in overflow or ():
                if queue not in self.declared:
                    channel.queue_declare(queue, durable=True, auto_delete=False)
                    self.declared.add(queue)
                    log.warning("queue.overflow_declared", queue=queue)
            for (queue, key), event_class in needed.items():
                if (queue, key) in self.bound and not refresh:
                    continue
                channel = self.declare(channel, queue, event_class)
                channel.queue_bind(queue, EXCHANGE, key)
                if (queue, key) not in self.bound:
                    log.info("queue.bound", queue=queue, routing_key=key)
                self.bound.add((queue, key))
            stale = {b for b in self.bound if b not in needed}
            if not self.cleaned_after_start:
                stale |= {b for b in load_cancelled_bindings() if b not in needed}
                self.cleaned_after_start = True
            for queue, key in stale:
                channel.queue_unbind(queue, EXCHANGE, key)
                self.bound.discard((queue, key))
                log.info("queue.unbound", queue=queue, routing_key=key)
        except (OSError, amqp.exceptions.AMQPError) as exc:
            # A lost broker, or a queue deleted between two rounds: start over next time.
            log.warning("queue.declare_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            self.close()
            raise

    def declare_exchanges(self, channel: amqp.Channel) -> amqp.Channel:
        """The events exchange, and its alternate exchange into the bounded queue of what nothing was bound for."""
        assert self.conn is not None
        self.channel = channel = declare_events_exchange(self.conn, channel)  # a new one if it had to reopen
        channel.exchange_declare(UNROUTABLE, "fanout", durable=True, auto_delete=False)
        channel.queue_declare(UNROUTABLE, durable=True, auto_delete=False, arguments=UNROUTABLE_ARGUMENTS)
        channel.queue_bind(UNROUTABLE, UNROUTABLE, "")
        if not self.policy_set:
            self.set_policy()
        return channel

    def set_policy(self) -> None:
        """Best effort: without it, market events no queue is bound for are dropped by RabbitMQ, as before."""
        management_url = settings.RABBITMQ_MANAGEMENT_URL
        try:
            if not management_url:
                raise OSError("RABBITMQ_MANAGEMENT_URL is not set")
            alternate_exchange_policy(self.url, management_url)
            self.policy_set = True
        except (OSError, ValueError) as exc:
            if self.throttle.allow("policy") is not None:
                log.warning(
                    "exchange.alternate_exchange_missing",
                    exchange=EXCHANGE,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    hint=f"rabbitmqctl set_policy {ALTERNATE_EXCHANGE_POLICY} '^ws-gateway\\.events$' "
                    f'\'{{"alternate-exchange":"{UNROUTABLE}"}}\' --apply-to exchanges',
                )

    def declare(self, channel: amqp.Channel, queue: str, event_class: str) -> amqp.Channel:
        """Declare a service queue; one that exists with other arguments is used as it is.

        Changing a QUEUE_MAX_LENGTH_* setting does not change queues that already exist
        (RabbitMQ refuses a redeclare with other arguments): we keep delivering to them and say
        so, rather than stop every subscription. Delete the queue to apply the new limit.
        """
        arguments = queue_arguments(event_class)
        try:
            channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
            return channel
        except amqp.exceptions.PreconditionFailed as exc:
            if self.throttle.allow(f"arguments:{queue}") is not None:
                log.warning("queue.arguments_differ", queue=queue, wanted=arguments, error=str(exc)[:300])
            self.channel = channel = self.conn.channel()  # type: ignore[union-attr] - the error closed the channel
            channel.queue_declare(queue, passive=True)
            return channel

    def deepest(self, queues: list[str]) -> tuple[int, str]:
        """The most messages waiting in one of `queues` that has a consumer, and its name.

        A queue nobody consumes from is left out: a stopped service is the slow-consumer alert's
        business, and must not slow every other service's books. A missing queue is skipped.
        """
        deepest, name = 0, ""
        try:
            channel = self.open()
            for queue in queues:
                try:
                    _, messages, consumers = channel.queue_declare(queue, passive=True)
                except amqp.exceptions.NotFound:
                    self.channel = channel = self.conn.channel()  # type: ignore[union-attr] - the error closed it
                    continue
                if consumers and messages > deepest:
                    deepest, name = messages, queue
        except (OSError, amqp.exceptions.AMQPError):
            self.close()
            raise
        return deepest, name

    def open(self) -> amqp.Channel:
        if self.channel is None or self.conn is None or not self.conn.connected:
            self.conn = connect(self.url, name="ws-gateway declarations")
            self.channel = self.conn.channel()
            self.bound.clear()
            self.declared_at = 0.0  # a new connection: check everything
            self.policy_set = False
        return self.channel

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except (OSError, amqp.exceptions.AMQPError):
                pass
        self.conn = self.channel = None


class Reconciler:
    """Keeps the gateway's sockets and the queue bindings equal to the live subscriptions."""

    def __init__(self, gateway: Gateway, interval: float) -> None:
        self.gateway = gateway
        self.interval = interval
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-io")
        self.background: set[asyncio.Task[Any]] = set()
        self.bindings = Bindings(gateway.config.rabbitmq_url, gateway.config.redeclare_interval)
        self.rejected: dict[tuple[str, str], str] = {}  # (socket category, topic) -> Bybit's ret_msg
        self.seen: dict[tuple[str, str], float] = {}  # (socket category, topic) -> last event time
        self.last_events_flushed = 0.0
        self.private_classes: set[str] = set()  # of the live private subscriptions: what recovery repairs
        # The live rows of the last round, and the ids of those whose queue is declared, bound and
        # routed to: only these may turn active (a row created after the round must wait for the next).
        self.rows: list[Row] = []
        self.ready: set[str] = set()
        self.nudged = asyncio.Event()
        self.nudges: NudgeListener | None = None
        self.throttle = LogThrottle()

    async def once(self) -> None:
        """Make the sockets' topics and the queue bindings equal to the live subscriptions."""
        gw = self.gateway
        rows = await self.in_io(load_live_rows)
        if gw.config.credentials is None and any(r.socket_category == PRIVATE for r in rows):
            message = "private streams need BYBIT_API_KEY and BYBIT_API_SECRET"
            failed = await self.in_io(mark_failed, PRIVATE, None, message)
            log.error("gateway.private_without_credentials", failed_subscriptions=failed)
            rows = [r for r in rows if r.socket_category != PRIVATE]
        publisher = gw.publisher
        ids = {r.id for r in rows}
        self.rows, self.ready = rows, self.ready & ids
        try:
            await self.in_io(self.bindings.ensure, rows, publisher.confirms.overflow_queues())
        finally:  # routed even when the declares failed: a publish to a missing queue comes back and waits
            publisher.route_private((r.queue_name, r.routing_key) for r in rows if r.event_class in PRIVATE_CLASSES)
        self.ready = ids
        self.private_classes = {r.event_class for r in rows if r.event_class in PRIVATE_CLASSES}
        gw.recovery.live_queues(
            {r.queue_name: r.event_class for r in rows if r.event_class in PRIVATE_CLASSES and r.status == "active"}
        )

        wanted: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            if (row.socket_category, row.bybit_topic) not in self.rejected:
                wanted[row.socket_category].add(row.bybit_topic)
        current = {name: (s.category, set(s.desired)) for name, s in gw.sockets.items()}
        plan = assign(wanted, current)
        for name, (category, topics) in plan.items():
            sock = gw.sockets.get(name) or gw.open_socket(name, category)
            if sock.desired != topics:
                gw.market.forget(category, sock.desired - topics)
                sock.want(topics)
        for name in [n for n in gw.sockets if n not in plan]:
            gw.market.forget(gw.sockets[name].category, gw.sockets[name].desired)
            await gw.close_socket(name)

        # Rows whose topic is already live (a second service, or rows created while we were down).
        live = {(s.category, t) for s in gw.sockets.values() for t in s.live}
        if pending := [r.id for r in rows if r.status == "pending" and (r.socket_category, r.bybit_topic) in live]:
            await self.in_io(mark_active, pending)

        if time.monotonic() - self.last_events_flushed > LAST_EVENT_FLUSH_INTERVAL and self.seen:
            seen = dict(self.seen)
            self.seen.clear()  # the same dict: the per-frame path writes into it
            self.last_events_flushed = time.monotonic()
            await self.in_io(record_last_events, seen)

    async def watch_backlog(self, stop: asyncio.Event, limit: int) -> None:
        """While a service's market queue holds more than `limit` messages, consumers are behind: pace."""
        pacing, wait = self.gateway.handoff.pacing, BACKLOG_POLL
        while not stop.is_set():
            await wait_or_timeout(stop, wait)
            queues = sorted({r.queue_name for r in self.rows if r.event_class not in PRIVATE_CLASSES})
            started = time.monotonic()
            try:
                depth, queue = await self.in_io(self.bindings.deepest, queues)
            except (OSError, amqp.exceptions.AMQPError) as exc:
                if self.throttle.allow("backlog") is not None:
                    log.warning("pacing.backlog_unknown", error=f"{type(exc).__name__}: {exc}"[:200])
                pacing.consumers_behind(False, now_ms())  # unknown: only the gateway's own read lag counts
                await wait_or_timeout(stop, BACKLOG_RETRY)
                continue
            # Hundreds of queues take a while to look at: then look less often, so the I/O thread
            # (and the GIL it shares with the event loop) spends at most a fifth of its time on it.
            wait = max(BACKLOG_POLL, 4 * (time.monotonic() - started))
            behind = depth > limit
            if behind != pacing.downstream:
                log.info("pacing.consumers_behind" if behind else "pacing.consumers_caught_up", queue=queue,
                         messages=depth, limit=limit)  # fmt: skip
            pacing.consumers_behind(behind, now_ms())

    def redeclare(self) -> None:
        """Queues or bindings may be gone (the publisher reconnected, or a publish came back): declare them now."""
        self.bindings.invalidate()
        self.nudged.set()

    async def in_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database/AMQP work on the single I/O thread."""
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

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

    def listen(self) -> None:
        """Start the nudge listener: the API's control messages ask for a reconciliation now."""
        self.nudges = NudgeListener(self.gateway.config.rabbitmq_url, self.gateway.nudge)
        self.nudges.thread.start()

    async def finish(self, timeout: float) -> None:
        """Stop the nudge listener, then wait (up to `timeout` s) for row writes still running in the background."""
        if self.nudges is not None:
            self.nudges.stopping.set()
            await asyncio.to_thread(self.nudges.thread.join, 1.0)
        if self.background:
            await asyncio.wait(self.background, timeout=timeout)

    def close(self) -> None:
        """Close the declarations connection and the I/O thread's database connection, then the thread."""
        self.io.submit(self.bindings.close)
        self.io.submit(connection.close)  # Django keeps one connection per thread
        self.io.shutdown(wait=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every `interval` seconds, and at once when nudged, until `stop`."""
        while not stop.is_set():
            try:
                await self.once()
            except (DatabaseError, OSError, amqp.exceptions.AMQPError) as exc:
                if self.throttle.allow("reconcile") is not None:
                    log.warning("gateway.reconcile_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            try:
                await asyncio.wait_for(self.nudged.wait(), self.interval)
            except TimeoutError:
                pass
            self.nudged.clear()

    def topics_confirmed(self, sock: BybitSocket, topics: list[str]) -> None:
        """Bybit confirmed these topics: their pending rows that the last round made ready become active."""
        log.info("bybit.subscribed", socket=sock.name, topics=len(topics), first=topics[0])
        if sock.category == PRIVATE:
            # A private stream (re)started: what happened while it was down is only on Bybit's REST API.
            self.gateway.recovery.request("subscribed")
        confirmed = set(topics)
        ids = [
            r.id
            for r in self.rows
            if r.id in self.ready and r.socket_category == sock.category and r.bybit_topic in confirmed
        ]
        if ids:
            self.in_background(mark_active, ids)

    def topic_rejected(self, sock: BybitSocket, topic: str, message: str) -> None:
        """Bybit refused a topic: fail its rows. (Refused credentials fail nothing: the socket retries auth.)"""
        log.warning("bybit.subscribe_rejected", socket=sock.name, topic=topic, ret_msg=message)
        key = (sock.category, topic)
        self.rejected[key] = message
        task = self.in_background(mark_failed, sock.category, [topic], message)
        task.add_done_callback(lambda _t: self.rejected.pop(key, None))


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
