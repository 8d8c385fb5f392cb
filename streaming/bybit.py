"""Bybit V5 WebSocket connections, the I/O half: connect, auth, read, heartbeat, reconnect.

One `BybitSocket` holds one connection (public per category, or the private one) and keeps
the topics it is told to want subscribed across reconnects. Which requests to send and what
Bybit's replies mean is `streaming.protocol.Subscriptions`' business; this module only moves
them over the wire. Frames go to the gateway's `on_frame` callback one by one; control
replies come back here. The endpoint's own `CircuitBreaker` and the `ConnectionBudget` all
sockets share (streaming.circuit) keep them polite to Bybit, without one failing endpoint
holding up the others.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from streaming.circuit import CircuitBreaker, ConnectionBudget, backoff_delay
from streaming.protocol import AuthReply, Request, Subscriptions, auth_reply, auth_request
from streaming.wsread import DirectConnection

log = structlog.get_logger(__name__)

T = TypeVar("T")

PUBLIC_CATEGORIES = ("spot", "linear", "inverse", "option")
ENDPOINTS = {
    # environment: (public base, private URL)
    "mainnet": ("wss://stream.bybit.com/v5/public", "wss://stream.bybit.com/v5/private"),
    "testnet": ("wss://stream-testnet.bybit.com/v5/public", "wss://stream-testnet.bybit.com/v5/private"),
    # Demo trading has only private streams; its market data is mainnet's.
    "demo": ("wss://stream.bybit.com/v5/public", "wss://stream-demo.bybit.com/v5/private"),
}
RECEIVE_QUEUE = 1024  # frames websockets buffers before it stops reading the socket


def endpoints(environment: str, ws_url: str = "", simulator: tuple[str, int] = ("127.0.0.1", 8765)) -> tuple[str, str]:
    """Return (public base, private URL); the public URL of a category is `{base}/{category}`."""
    if ws_url:
        return f"{ws_url}/v5/public", f"{ws_url}/v5/private"
    if environment == "simulator":
        base = f"ws://{simulator[0]}:{simulator[1]}"
        return f"{base}/v5/public", f"{base}/v5/private"
    return ENDPOINTS[environment]


@dataclass(frozen=True, slots=True)
class SocketConfig:
    ping_interval: float
    dead_after: float
    connect_timeout: float
    backoff_base: float
    backoff_cap: float
    healthy_after: float
    auth_retry_cap: float  # longest wait between auth attempts while Bybit refuses the credentials
    max_frame_bytes: int
    reply_timeout: float = 10.0  # seconds a subscribe/unsubscribe waits for its reply before it is sent again


class AuthRejected(Exception):
    """Bybit refused the credentials; retrying at once would not help."""


class DeadSocket(Exception):
    """No frame and no pong within the dead window."""


class Unanswered(Exception):
    """Requests went unanswered however often they were sent: the connection is not serving us."""


CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake, InvalidURI)


async def dial(url: str, config: SocketConfig) -> DirectConnection:
    """Open one WebSocket connection with the options every Bybit socket uses."""
    ws = await asyncio.wait_for(
        connect(
            url,
            open_timeout=config.connect_timeout,
            ping_interval=None,  # Bybit's own op=ping heartbeat, in BybitSocket.heartbeat
            close_timeout=1,
            max_size=config.max_frame_bytes * 4,
            # Bounded: while the gateway pauses reads, TCP (not memory) absorbs the backlog.
            max_queue=RECEIVE_QUEUE,
            compression=None,
            create_connection=DirectConnection,  # text frames straight to the gateway (streaming.wsread)
        ),
        config.connect_timeout,
    )
    return cast(DirectConnection, ws)  # create_connection made it one


async def until_stopped(awaitable: Awaitable[T], stopping: asyncio.Event) -> T | None:
    """Await `awaitable` unless `stopping` is set first (it is then cancelled); None if stopped.

    When both happen in one tick the result wins: the caller gets it and checks `stopping`.
    """
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


async def exchange_auth(ws: ClientConnection, credentials: tuple[str, str], timeout: float) -> AuthReply:
    """Send Bybit's auth request and return its answer; frames before the answer are skipped."""
    await ws.send(auth_request(*credentials, int(time.time() * 1000)))
    deadline = time.monotonic() + timeout
    reply = None
    while reply is None:
        reply = auth_reply(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
    return reply


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stopping` is set meanwhile."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass


# Called with (socket, topics that Bybit confirmed) and (socket, topic, Bybit's ret_msg).
AckCallback = Callable[["BybitSocket", list[str]], None]
RejectCallback = Callable[["BybitSocket", str, str], None]
FrameCallback = Callable[[str | bytes, "BybitSocket"], "dict[str, Any] | None"]
# Awaited after a frame when the gateway's hand-off is nearly full: reads pause, the publisher runs.
Backpressure = tuple[Callable[[], bool], Callable[[], Awaitable[None]]]


def describe(request: Request) -> dict[str, Any]:
    """A request's fields for a log line."""
    first = request.topics[0] if request.topics else None
    return {"op": request.op, "req_id": request.req_id, "topics": len(request.topics), "first": first}


@dataclass
class SocketHealth:
    """What an operator sees of one socket besides its state: outages, the last error, auth refusals."""

    reconnects: int = 0
    last_frame_at: float | None = None  # time.time() of the last frame
    down_since: float | None = None
    last_outage: dict[str, float] | None = None
    last_error: str = ""
    auth_error: str = ""  # Bybit's ret_msg while it refuses the credentials, else ""
    auth_failures: int = 0  # refusals since the process started
    auth_refused_in_a_row: int = 0
    auth_failing_since: float | None = None  # time.time() of the first refusal in a row

    def down(self, now: float) -> None:
        """The connection is gone (or never came): an outage starts, unless one is running."""
        if self.down_since is None:
            self.down_since = now
            self.reconnects += 1

    def up(self, now: float) -> float | None:
        """Connected: end the outage and return its length in seconds; None on the first connect."""
        if self.down_since is None:
            return None
        self.last_outage = {"from": self.down_since, "to": now, "seconds": round(now - self.down_since, 3)}
        self.down_since = None
        return self.last_outage["seconds"]

    def auth_refused(self, error: str, now: float) -> None:
        self.auth_error = error
        self.auth_failures += 1
        self.auth_refused_in_a_row += 1
        self.auth_failing_since = self.auth_failing_since or now

    def auth_accepted(self) -> int:
        """Credentials accepted: clear the refusal; return how many refusals in a row it ends."""
        ended = self.auth_refused_in_a_row
        self.auth_error, self.auth_refused_in_a_row, self.auth_failing_since = "", 0, None
        return ended

    def snapshot(self) -> dict[str, Any]:
        return {
            "last_frame_at": self.last_frame_at,
            "reconnects": self.reconnects,
            "last_outage": self.last_outage,
            "last_error": self.last_error,
            "auth_error": self.auth_error,
            "auth_failures": self.auth_failures,
            "auth_failing_since": self.auth_failing_since,
        }


class BybitSocket:
    """One Bybit connection that keeps `desired` topics subscribed until stopped."""

    def __init__(
        self,
        name: str,
        url: str,
        category: str,
        config: SocketConfig,
        breaker: CircuitBreaker,
        budget: ConnectionBudget,
        on_frame: FrameCallback,
        on_ack: AckCallback,
        on_reject: RejectCallback,
        credentials: tuple[str, str] | None = None,
        backpressure: Backpressure | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.category = category  # a public category, or "private"
        self.config = config
        self.breaker = breaker
        self.budget = budget
        self.on_frame = on_frame
        self.on_ack = on_ack
        self.on_reject = on_reject
        self.credentials = credentials
        self.backpressure = backpressure
        self.subscriptions = Subscriptions(deadline=config.reply_timeout)
        # The core's own sets, never rebound: the gateway's per-frame check reads them without a call.
        self.desired = self.subscriptions.desired
        self.live = self.subscriptions.live
        self.kick = asyncio.Event()
        self.stopping = asyncio.Event()
        self.ws: ClientConnection | None = None
        self.state = "idle"
        self.last_frame_mono = 0.0
        self.health = SocketHealth()

    def want(self, topics: set[str]) -> None:
        """Replace the topics this socket should hold; the change is sent at once."""
        self.subscriptions.want(topics)
        self.kick.set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "state": self.state,
            "topics": len(self.live),
            "wanted": len(self.desired),
            **self.health.snapshot(),
        }

    async def run(self) -> None:
        """Connect, subscribe, read; reconnect with backoff until `stop()`."""
        attempt = 0
        while not self.stopping.is_set():
            self.state = "waiting_circuit" if self.breaker.state != "closed" else "connecting"
            try:
                ws = await until_stopped(self.connect(), self.stopping)
            except CONNECT_ERRORS as exc:
                error = self.health.last_error = f"connect: {type(exc).__name__}: {exc}"[:200]
                delay = backoff_delay(attempt, self.config.backoff_base, self.config.backoff_cap)
                attempt += 1
                log.warning("bybit.connect_failed", socket=self.name, error=error, retry_in=round(delay, 3))
                self.mark_down()
                await pause(self.stopping, delay)
                continue
            if ws is None:
                break
            if self.stopping.is_set():
                await ws.close()
                break
            connected_at = time.monotonic()
            try:
                await self.session(ws)
            except AuthRejected:
                await ws.close()
                self.mark_down()
                self.state = "auth_failed"
                refused = self.health.auth_refused_in_a_row
                delay = backoff_delay(refused - 1, self.config.backoff_base, self.config.auth_retry_cap)
                log.error("bybit.auth_rejected", socket=self.name, ret_msg=self.health.auth_error,
                          refused_in_a_row=refused, retry_in=round(delay, 3))  # fmt: skip
                await pause(self.stopping, delay)
                continue
            except (ConnectionClosed, OSError, TimeoutError, DeadSocket, Unanswered) as exc:
                ws.transport.abort()  # a peer that stopped answering gets no closing handshake
                error = self.health.last_error = f"{type(exc).__name__}: {exc}"[:200]
                log.warning("bybit.disconnected", socket=self.name, error=error)
            finally:
                self.ws = None
                self.subscriptions.disconnect()
            if self.stopping.is_set():
                break
            self.mark_down()
            if time.monotonic() - connected_at >= self.config.healthy_after:
                attempt = 0
            delay = backoff_delay(attempt, self.config.backoff_base, self.config.backoff_cap)
            attempt += 1
            log.info("bybit.reconnecting", socket=self.name, retry_in=round(delay, 3), attempt=attempt)
            await pause(self.stopping, delay)
        self.state = "stopped"

    async def connect(self) -> DirectConnection:
        """One attempt through the endpoint's breaker and the shared budget; the breaker hears how it went."""
        async with self.breaker.attempt():
            await self.budget.acquire()
            self.state = "connecting"
            try:
                ws = await dial(self.url, self.config)
            except CONNECT_ERRORS:
                await self.breaker.failure()
                raise
            try:
                await self.breaker.success()
            except asyncio.CancelledError:
                ws.transport.abort()  # stopped in the same breath: nobody else would close it
                raise
            return ws

    async def stop(self) -> None:
        """Stop reading and close the connection cleanly."""
        self.stopping.set()
        if self.ws is not None:
            await self.ws.close()

    def mark_down(self) -> None:
        self.state = "reconnecting"
        self.health.down(time.time())

    async def session(self, ws: DirectConnection) -> None:
        """One connected lifetime: auth, subscribe everything wanted, read until it ends."""
        self.ws = ws
        self.last_frame_mono = time.monotonic()
        if self.credentials is not None:  # the private socket
            self.state = "authenticating"
            await self.authenticate(ws, self.credentials)
        self.state = "connected"
        outage = self.health.up(time.time())
        if outage is not None:
            log.info("bybit.reconnected", socket=self.name, outage_seconds=outage)
        else:
            log.info("bybit.connected", socket=self.name, url=self.url)
        self.kick.set()
        tasks = [
            asyncio.create_task(self.read(ws), name=f"{self.name}-read"),
            asyncio.create_task(self.heartbeat(ws), name=f"{self.name}-heartbeat"),
            asyncio.create_task(self.sync_loop(ws), name=f"{self.name}-sync"),
            asyncio.create_task(self.stopping.wait(), name=f"{self.name}-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if self.stopping.is_set():
            await ws.close()

    async def authenticate(self, ws: ClientConnection, credentials: tuple[str, str]) -> None:
        reply = await exchange_auth(ws, credentials, self.config.connect_timeout)
        if not reply.accepted:
            # The subscriptions stay live: a refusal can pass (Bybit's own trouble, clock skew,
            # a key not yet active). The socket tries again with backoff, and /health and the
            # `gateway.private_auth_failed` alert say that private events are not arriving.
            self.health.auth_refused(reply.error, time.time())
            raise AuthRejected(reply.error)
        log.info("bybit.authenticated", socket=self.name, after_refusals=self.health.auth_accepted())

    async def read(self, ws: DirectConnection) -> None:
        # None for the private socket: it never waits for market data to drain.
        backlogged, relieve = self.backpressure or (None, None)
        await ws.read_all(self.take, backlogged, relieve)

    def take(self, raw: str | bytes) -> None:
        """One frame, read directly (streaming.wsread) or from `recv()`."""
        self.last_frame_mono = time.monotonic()
        control = self.on_frame(raw, self)
        if control is not None:
            self.on_control(control)

    async def heartbeat(self, ws: ClientConnection) -> None:
        interval, dead_after = self.config.ping_interval, self.config.dead_after
        counter = itertools.count(1)
        next_ping = time.monotonic() + interval
        while True:
            now = time.monotonic()
            self.health.last_frame_at = time.time() - (now - self.last_frame_mono)
            if now - self.last_frame_mono > dead_after:
                log.warning("bybit.socket_dead", socket=self.name, silent_for=round(now - self.last_frame_mono, 2))
                ws.transport.abort()
                raise DeadSocket(f"no frame for {now - self.last_frame_mono:.1f}s")
            if now >= next_ping:
                await ws.send(f'{{"req_id":"ping-{next(counter)}","op":"ping"}}')
                next_ping = now + interval
            await self.chase_replies(ws, now)
            await asyncio.sleep(min(0.25, interval, dead_after / 4))

    async def chase_replies(self, ws: ClientConnection, now: float) -> None:
        """Send overdue subscribe/unsubscribe requests again; give the connection up when they stay unanswered."""
        overdue = self.subscriptions.overdue(now)
        if overdue.give_up:
            first = overdue.give_up[0]
            log.warning("bybit.requests_unanswered", socket=self.name, requests=len(overdue.give_up), **describe(first))
            raise Unanswered(f"no reply to {first.op} {first.req_id} after {first.resends + 1} sends")
        for request in overdue.resend:
            log.warning("bybit.request_resent", socket=self.name, resends=request.resends, **describe(request))
            await ws.send(request.text())

    async def sync_loop(self, ws: ClientConnection) -> None:
        """Send what the core asks for whenever `want()` or a reply may have changed it."""
        while True:
            await self.kick.wait()
            self.kick.clear()
            for request in self.subscriptions.sync(time.monotonic()):
                await ws.send(request.text())

    def on_control(self, msg: dict[str, Any]) -> None:
        """Handle Bybit's replies: pongs need nothing (any frame is life); the core reads acks."""
        outcome = self.subscriptions.reply(msg, time.monotonic())
        if outcome.acked:
            self.on_ack(self, list(outcome.acked))
        for topic, message in outcome.rejected:
            self.on_reject(self, topic, message)
        if outcome.sync:
            self.kick.set()
        if outcome.send and self.ws is not None:
            for request in outcome.send:
                asyncio.get_running_loop().create_task(self.ws.send(request.text()))

    def resubscribe(self, topic: str) -> None:
        """Unsubscribe and subscribe again, for a fresh snapshot; the topics of one loop turn go together."""
        if self.ws is not None and self.subscriptions.ask_repair(topic):
            asyncio.get_running_loop().call_soon(self.send_repairs)

    def send_repairs(self) -> None:
        requests = self.subscriptions.repair_asked(time.monotonic())
        if self.ws is not None:
            for request in requests:
                asyncio.get_running_loop().create_task(self.ws.send(request.text()))
