"""The Bybit simulator's V5 WebSocket server: paths, auth, subscribe limits, market data pushes, heartbeats.

Replies and limits follow bybit-v5-protocol.md; strings we could not confirm word for word are the
named constants below. Faults and private events are set off through `control.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from streaming.simulator import market
from streaming.simulator.control import Control
from streaming.simulator.private import PrivateState
from streaming.simulator.rest import Rest

log = structlog.get_logger(__name__)

PUBLIC_PATHS = {f"/v5/public/{c}": c for c in ("spot", "linear", "inverse", "option")}
PRIVATE_PATH = "/v5/private"
PRIVATE_TOPICS = {"order", "execution", "position", "wallet", "greeks", "execution.fast"} | {
    f"{t}.{c}" for t in ("order", "execution", "position") for c in ("spot", "linear", "inverse", "option")
}

# Replies (bybit-v5-protocol.md §2-§4).
RET_SUBSCRIBE_PUBLIC = "subscribe"
RET_NOT_FOUND = "error:handler not found,topic:{topic}"
RET_ALREADY = "error:already subscribed,topic:{topic}"
RET_ARGS_SIZE = "args size >10"
RET_ARGS_LENGTH = "args length >21000"  # (check) exact string not confirmed
RET_INVALID_OP = "error:invalid op"
RET_DECODE = "Failed to decode incoming data: {error}"
RET_NEEDS_AUTH = "error:topic:{topic} needs auth first"  # (check) seen on v3; v5 wording unconfirmed
RET_AUTH_PARAMS = "Params Error"  # expired `expires` (seen from v5 with clock skew)
RET_AUTH_BAD_KEY = "API key is invalid."  # (check)
RET_AUTH_BAD_SIGN = "Invalid signature."  # (check)
RET_ALREADY_AUTHED = "Repeat auth"  # (check)
SPOT_ARGS_PER_REQUEST = 10
ARGS_CHARS_PER_CONNECTION = 21_000
PUSH_TICK = 0.001  # s: the shortest sleep between two turns of the paced push (each turn writes once per client)
AUTH_MAX_FUTURE_MS = 3_600_000  # (check) an `expires` an hour ahead is refused as Params Error


def auth_refusal(args: Any, credentials: dict[str, str], now: int) -> str | None:
    """Bybit's ret_msg refusing an `auth` request's [key, expires, signature], or None when they are good."""
    if not isinstance(args, list) or len(args) != 3:
        return RET_AUTH_PARAMS
    key, expires, signature = args
    try:
        expires = int(expires)
    except (TypeError, ValueError):
        return RET_AUTH_PARAMS
    if expires < now or expires > now + AUTH_MAX_FUTURE_MS:
        return RET_AUTH_PARAMS
    secret = credentials.get(str(key))
    if secret is None:
        return RET_AUTH_BAD_KEY
    expected = hmac.new(secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(signature)):
        return RET_AUTH_BAD_SIGN
    return None


def subscribe_refusal(
    category: str, live: set[str], args: list[str], authed: bool, symbols: dict[str, list[str]]
) -> str | None:
    """Bybit's ret_msg refusing a whole subscribe request (naming its first refused topic), or None to accept it.

    `live` is what the connection already subscribed; `category` is the socket's, or "private".
    """
    if category == "spot" and len(args) > SPOT_ARGS_PER_REQUEST:
        return RET_ARGS_SIZE
    chars = sum(map(len, live | set(args)))
    if category in ("linear", "inverse", "option") and chars > ARGS_CHARS_PER_CONNECTION:
        return RET_ARGS_LENGTH
    for topic in args:
        if category == "private":
            if topic not in PRIVATE_TOPICS:
                return RET_NOT_FOUND.format(topic=topic)
            if not authed:
                return RET_NEEDS_AUTH.format(topic=topic)
        elif not market.topic_valid(category, topic, symbols):
            return RET_NOT_FOUND.format(topic=topic)
        if topic in live:
            return RET_ALREADY.format(topic=topic)
    return None


def ws_frame(payload: bytes) -> bytes:
    """A server-to-client WebSocket text frame (unmasked, FIN)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


@dataclass(eq=False)
class Client:
    """One connected client and what it subscribed."""

    ws: ServerConnection
    category: str  # public category, or "private"
    conn_id: str
    topics: set[str] = field(default_factory=set)
    authed: bool = False
    welcome: list[bytes] = field(default_factory=list)  # snapshots owed to it after a subscribe ack
    held: list[bytes] = field(default_factory=list)  # private frames a stall holds up, as a stalled network does
    last_ping: float = field(default_factory=time.monotonic)

    def write(self, frames: bytes) -> bool:
        if self.ws.state is not State.OPEN:
            return False
        self.ws.transport.write(frames)
        return True


@dataclass
class Faults:
    """What the server is told to get wrong, set through the control surface."""

    stalled_until: float = 0.0  # monotonic time; no data and no pongs before it
    refuse_until: float = 0.0  # monotonic time; new connections get 503 before it
    refuse_path: str = ""  # when set, only connections to this path are refused
    ignore_requests_until: float = 0.0  # monotonic time; subscribe/unsubscribe go unanswered before it
    pong_delay: float = 0.0
    auth_rejected: bool = False
    late_until: float = 0.0  # monotonic time; market frames are stamped `late_ms` in the past before it
    late_ms: int = 0

    def is_stalled(self) -> bool:
        return time.monotonic() < self.stalled_until

    def is_refusing(self, path: str) -> bool:
        return time.monotonic() < self.refuse_until and self.refuse_path in ("", path)

    def is_ignoring_requests(self) -> bool:
        return time.monotonic() < self.ignore_requests_until


class Feed:
    """What the server pushes unasked: market data (a generator and a pusher per topic) and private events."""

    def __init__(self, clients: set[Client], faults: Faults, seed: int, rate: float | None) -> None:
        """`rate` multiplies Bybit's push cadence; None pushes as fast as each client reads."""
        self.clients = clients
        self.faults = faults
        self.seed = seed
        self.rate = rate
        self.generators: dict[tuple[str, str], market.Generator] = {}
        self.pushers: dict[str, asyncio.Task[None]] = {}  # "paced" (`rate` set) or "max"
        self.paced: dict[tuple[str, str], float] = {}  # a paced topic's next push (monotonic)
        self.due: list[tuple[float, tuple[str, str]]] = []  # heap of (next push, topic); stale ones skipped
        self.sent: Counter[tuple[str, str]] = Counter()  # data messages per (category, topic)

    def stop(self) -> None:
        for task in self.pushers.values():
            task.cancel()

    def generator(self, category: str, topic: str) -> market.Generator:
        key = (category, topic)
        if key not in self.generators:
            self.generators[key] = market.generator_for(category, topic, self.seed)
        return self.generators[key]

    def snapshot(self, category: str, topic: str) -> bytes | None:
        """A running topic's current state for a new subscriber, counted as sent; None before its first message."""
        snapshot = self.generator(category, topic).snapshot()
        if snapshot is None:
            return None
        self.sent[(category, topic)] += 1
        return ws_frame(orjson.dumps(snapshot))

    def start_pusher(self, category: str, topic: str) -> None:
        key = (category, topic)
        if self.rate is None:
            if "max" not in self.pushers:
                self.pushers["max"] = asyncio.create_task(self.push_max())
            return
        if key not in self.paced:
            self.paced[key] = at = time.monotonic() + self.interval(key)
            heapq.heappush(self.due, (at, key))
        if "paced" not in self.pushers:
            self.pushers["paced"] = asyncio.create_task(self.push())

    def maybe_stop_pusher(self, category: str, topic: str) -> None:
        if any(c.category == category and topic in c.topics for c in self.clients):
            return
        self.paced.pop((category, topic), None)  # its entry in `due` is skipped when it comes up

    def interval(self, key: tuple[str, str]) -> float:
        return market.push_interval(*key) / (self.rate or 1.0)

    def subscribers(self, category: str, topic: str) -> list[Client]:
        return [c for c in self.clients if c.category == category and topic in c.topics]

    def publish(self, category: str, topic: str) -> bytes:
        """The next message of a topic, counted as sent, as a ready WebSocket frame."""
        self.sent[(category, topic)] += 1
        message = self.generator(category, topic).next()
        if self.faults.late_until and time.monotonic() < self.faults.late_until:
            message["ts"] -= self.faults.late_ms  # as a reader seconds behind on its socket sees them
        return ws_frame(orjson.dumps(message))

    async def push(self) -> None:
        """Bybit's cadence for every subscribed topic, scaled by `rate`; skipped while stalled.

        One task for all topics: each turn sends what is due, one write per client, then sleeps
        until the next push (at least PUSH_TICK s, so a turn gathers the frames of that time).
        """
        due, paced = self.due, self.paced
        while True:
            now = time.monotonic()
            out: dict[Client, list[bytes]] = {}
            while due and due[0][0] <= now:
                at, key = heapq.heappop(due)
                if paced.get(key) != at:
                    continue  # the topic stopped, or was started again with its own time
                paced[key] = at = at + self.interval(key)
                heapq.heappush(due, (at, key))
                if self.faults.is_stalled():
                    continue
                clients = self.subscribers(*key)
                if clients:
                    frame = self.publish(*key)
                    for client in clients:
                        out.setdefault(client, []).append(frame)
            for client, frames in out.items():
                client.write(b"".join(frames))
            wait = due[0][0] - time.monotonic() if due else PUSH_TICK
            await asyncio.sleep(max(PUSH_TICK, wait))

    async def push_max(self, batch: int = 256) -> None:
        """As fast as each client reads: frames built in batches, written in one go, flow-controlled."""
        while True:
            if self.faults.is_stalled() or not self.clients:
                await asyncio.sleep(0.01)
                continue
            busy = False
            for client in list(self.clients):
                topics = sorted(client.topics) if client.category != "private" else []
                if not topics or client.ws.state is not State.OPEN:
                    continue
                busy = True
                frames = [self.publish(client.category, topics[i % len(topics)]) for i in range(batch)]
                if client.write(b"".join(frames)):
                    try:
                        await client.ws.drain()
                    except ConnectionClosed:
                        pass
            await asyncio.sleep(0 if busy else 0.01)

    def send_private(self, message: dict[str, Any], category: str | None) -> None:
        """Write a private event to every authed client subscribed to its topic or the topic's `category` form."""
        topic = message["topic"]
        for client in list(self.clients):
            if client.category == "private" and client.authed:
                for subscribed in (topic, f"{topic}.{category}"):
                    if subscribed in client.topics:
                        sent = {**message, "topic": subscribed}
                        self.sent[("private", subscribed)] += 1
                        if self.faults.is_stalled():
                            client.held.append(ws_frame(orjson.dumps(sent)))
                        else:
                            client.write(ws_frame(orjson.dumps(sent)))

    def release_held(self) -> None:
        """A stall is over: what it held up arrives now, on the connections that outlived it."""
        for client in list(self.clients):
            held, client.held = client.held, []
            if held:
                client.write(b"".join(held))


class Simulator:
    """The V5 WebSocket server; its control surface (`control.py`) is reachable through its methods too."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int | None = 0,
        seed: int = 1,
        symbols: dict[str, list[str]] | None = None,
        rate: float | None = 1.0,
        credentials: dict[str, str] | None = None,
        ping_timeout: float = 600.0,
    ) -> None:
        """`rate` multiplies Bybit's push cadence; None pushes as fast as the client reads."""
        self.host = host
        self.requested_port = port
        self.requested_control_port = control_port
        self.seed = seed
        self.symbols = symbols or market.DEFAULT_SYMBOLS
        self.rate = rate
        self.credentials = credentials or {}
        self.ping_timeout = ping_timeout
        self.clients: set[Client] = set()
        self.faults = Faults()
        self.feed = Feed(self.clients, self.faults, seed, rate)
        self.subscribes: Counter[tuple[str, str]] = Counter()  # accepted subscribe per (category, topic)
        self.requests: list[dict[str, Any]] = []  # every op received, in order
        self.conn_ids = itertools.count(1)
        self.refused = 0  # connection attempts answered 503 while refusing
        self.server: Server | None = None
        self.control = Control(self)
        self.private = PrivateState()  # every private event emitted, listened to or not
        self.ledger = self.private.ledger
        self.rest = Rest(self)  # Bybit's REST endpoints for private state, served on the control port

    @property
    def sent(self) -> Counter[tuple[str, str]]:
        """Data messages sent per (category, topic)."""
        return self.feed.sent

    @property
    def generators(self) -> dict[tuple[str, str], market.Generator]:
        return self.feed.generators

    # Lifecycle.

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    @property
    def control_port(self) -> int | None:
        return self.control.port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    async def start(self) -> None:
        self.server = await serve(
            self.handler,
            self.host,
            self.requested_port,
            process_request=self.process_request,
            ping_interval=None,
            compression=None,
            max_size=2**20,
            close_timeout=1,  # stopping must not wait on clients that never answer the close
        )
        if self.requested_control_port is not None:
            await self.control.start(self.host, self.requested_control_port)
        log.info("sim.started", url=self.url, control_port=self.control_port, rate=self.rate, seed=self.seed)

    async def stop(self) -> None:
        self.feed.stop()
        self.control.stop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        log.info("sim.stopped", sent=sum(self.sent.values()))

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # WebSocket protocol.

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.faults.is_refusing(request.path.split("?")[0]):
            self.refused += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "refusing connections (simulated)\n")
        if request.path.split("?")[0] not in PUBLIC_PATHS and request.path.split("?")[0] != PRIVATE_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown path\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?")[0] if ws.request else ""
        category = PUBLIC_PATHS.get(path, "private")
        client = Client(ws, category, f"sim-{os.getpid()}-{next(self.conn_ids)}")
        self.clients.add(client)
        watchdog = asyncio.create_task(self.watchdog(client))
        try:
            async for raw in ws:
                client.last_ping = time.monotonic()
                await self.on_message(client, raw)
        except ConnectionClosed:
            pass
        finally:
            watchdog.cancel()
            self.clients.discard(client)
            for topic in client.topics:
                self.feed.maybe_stop_pusher(category, topic)

    async def watchdog(self, client: Client) -> None:
        """Close a connection that sent nothing (no ping) for `ping_timeout` s, as Bybit does."""
        while True:
            idle = time.monotonic() - client.last_ping
            if idle > self.ping_timeout:
                await client.ws.close(1000, "heartbeat timeout")
                return
            await asyncio.sleep(min(1.0, self.ping_timeout - idle + 0.01))

    async def reply(self, client: Client, message: dict[str, Any]) -> None:
        await client.ws.send(orjson.dumps(message).decode())

    async def on_message(self, client: Client, raw: str | bytes) -> None:
        self.requests.append({"category": client.category, "raw": raw if isinstance(raw, str) else repr(raw)})
        try:
            msg = orjson.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            await self.reply(
                client, {"success": False, "ret_msg": RET_DECODE.format(error=exc), "conn_id": client.conn_id}
            )
            return
        op, req_id = msg.get("op"), msg.get("req_id")
        self.requests[-1].update(op=op, args=msg.get("args"))
        base = {"conn_id": client.conn_id, "op": op, **({"req_id": req_id} if req_id is not None else {})}
        if op == "ping":
            if self.faults.is_stalled():
                return
            if self.faults.pong_delay:
                await asyncio.sleep(self.faults.pong_delay)
            if client.category == "private":
                await self.reply(client, {**base, "op": "pong", "args": [str(market.now_ms())]})
            else:
                await self.reply(client, {"success": True, "ret_msg": "pong", **base})
        elif op == "auth" and client.category == "private":
            await self.reply(client, {**base, **self.authenticate(client, msg.get("args"))})
        elif op in ("subscribe", "unsubscribe"):
            if self.faults.is_ignoring_requests():
                return
            args = msg.get("args")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                await self.reply(client, {"success": False, "ret_msg": RET_INVALID_OP, **base})
                return
            result = self.subscribe(client, args) if op == "subscribe" else self.unsubscribe(client, args)
            await self.reply(client, {**result, **base})
            if client.welcome:
                client.write(b"".join(client.welcome))
                client.welcome.clear()
        else:
            await self.reply(client, {"success": False, "ret_msg": RET_INVALID_OP, **base})

    def authenticate(self, client: Client, args: Any) -> dict[str, Any]:
        if client.authed:
            return {"success": False, "ret_msg": RET_ALREADY_AUTHED}
        # Rejecting every auth is knowing no key: malformed args still get Params Error first.
        credentials = {} if self.faults.auth_rejected else self.credentials
        refusal = auth_refusal(args, credentials, market.now_ms())
        if refusal is not None:
            return {"success": False, "ret_msg": refusal}
        client.authed = True
        return {"success": True, "ret_msg": ""}

    def subscribe(self, client: Client, args: list[str]) -> dict[str, Any]:
        """Apply a subscribe request whole or not at all; name the first refused topic."""
        refusal = subscribe_refusal(client.category, client.topics, args, client.authed, self.symbols)
        if refusal is not None:
            return {"success": False, "ret_msg": refusal}
        for topic in args:
            client.topics.add(topic)
            self.subscribes[(client.category, topic)] += 1
            if client.category != "private":
                # A running topic greets each new subscriber with a snapshot, as Bybit does.
                snapshot = self.feed.snapshot(client.category, topic)
                if snapshot is not None:
                    client.welcome.append(snapshot)
                self.feed.start_pusher(client.category, topic)
        ret_msg = "" if client.category == "private" else RET_SUBSCRIBE_PUBLIC
        return {"success": True, "ret_msg": ret_msg}

    def unsubscribe(self, client: Client, args: list[str]) -> dict[str, Any]:
        for topic in args:
            client.topics.discard(topic)
            self.feed.maybe_stop_pusher(client.category, topic)
        return {"success": True, "ret_msg": "" if client.category == "private" else "unsubscribe"}

    def stats(self) -> dict[str, Any]:
        return self.control.stats()

    # The control surface, callable on the simulator as tests and scripts use it.

    async def emit_order(self, **fields: Any) -> dict[str, Any]:
        return await self.control.emit("order", **fields)

    async def emit_execution(self, **fields: Any) -> dict[str, Any]:
        return await self.control.emit("execution", **fields)

    async def emit_position(self, **fields: Any) -> dict[str, Any]:
        return await self.control.emit("position", **fields)

    async def emit_wallet(self, **fields: Any) -> dict[str, Any]:
        return await self.control.emit("wallet", **fields)

    async def drop_connections(self, abrupt: bool = False) -> int:
        return await self.control.drop_connections(abrupt)

    async def stall(self, seconds: float) -> None:
        await self.control.stall(seconds)

    async def refuse(self, seconds: float, path: str = "") -> None:
        await self.control.refuse(seconds, path)

    async def reject_auth(self, on: bool = True) -> None:
        await self.control.reject_auth(on)

    async def delay_pongs(self, seconds: float) -> None:
        await self.control.delay_pongs(seconds)

    async def send_malformed(self, kind: str, category: str | None = None) -> int:
        return await self.control.send_malformed(kind, category)

    async def gap(self, category: str, topic: str) -> None:
        await self.control.gap(category, topic)

    async def restart_book(self, category: str, topic: str) -> None:
        await self.control.restart_book(category, topic)
