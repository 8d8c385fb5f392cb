"""A local Bybit V5 WebSocket server for tests, `make demo` and `make bench`.

Paths, replies, limits and auth follow bybit-v5-protocol.md; strings we could not confirm
word for word are the named constants below. Market data comes from `simulator_market`.
A plain-HTTP control API (its own port, JSON bodies) triggers private events and faults:

    POST /control/orders {"symbol": "BTCUSDT", ...}   (also /executions /positions /wallet)
    POST /control/faults/drop {"abrupt": false}       POST /control/faults/stall {"seconds": 3}
    POST /control/faults/refuse {"seconds": 3}        POST /control/faults/reject_auth {"on": true}
    POST /control/faults/delay_pongs {"seconds": 1}   POST /control/faults/malformed {"kind": "invalid_json"}
    POST /control/faults/gap {"category": "linear", "topic": "orderbook.50.BTCUSDT"}
    POST /control/faults/restart_book {...same...}    GET /control/stats
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from streaming import simulator_market as market

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
AUTH_MAX_FUTURE_MS = 3_600_000  # (check) an `expires` an hour ahead is refused as Params Error

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


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
    last_ping: float = field(default_factory=time.monotonic)

    def write(self, frames: bytes) -> bool:
        if self.ws.state is not State.OPEN:
            return False
        self.ws.transport.write(frames)
        return True


class Simulator:
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
        self.generators: dict[tuple[str, str], market.Generator] = {}
        self.pushers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.sent: Counter[tuple[str, str]] = Counter()  # data messages per (category, topic)
        self.subscribes: Counter[tuple[str, str]] = Counter()  # accepted subscribe per (category, topic)
        self.requests: list[dict[str, Any]] = []  # every op received, in order
        self.private_events = itertools.count(1)
        self.conn_ids = itertools.count(1)
        self.stalled_until = 0.0
        self.refuse_until = 0.0
        self.pong_delay = 0.0
        self.auth_rejected = False
        self.refused = 0  # connection attempts answered 503 while refusing
        self.server: Server | None = None
        self.control: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.routes: dict[str, Handler] = {
            "/control/orders": lambda b: self.emit("order", **b),
            "/control/executions": lambda b: self.emit("execution", **b),
            "/control/positions": lambda b: self.emit("position", **b),
            "/control/wallet": lambda b: self.emit("wallet", **b),
            "/control/faults/drop": lambda b: self.drop_connections(bool(b.get("abrupt"))),
            "/control/faults/stall": lambda b: self.stall(float(b.get("seconds", 5))),
            "/control/faults/refuse": lambda b: self.refuse(float(b.get("seconds", 5))),
            "/control/faults/reject_auth": lambda b: self.reject_auth(bool(b.get("on", True))),
            "/control/faults/delay_pongs": lambda b: self.delay_pongs(float(b.get("seconds", 1))),
            "/control/faults/malformed": lambda b: self.send_malformed(
                b.get("kind", "invalid_json"), b.get("category")
            ),
            "/control/faults/gap": lambda b: self.gap(b["category"], b["topic"]),
            "/control/faults/restart_book": lambda b: self.restart_book(b["category"], b["topic"]),
        }

    # Lifecycle.

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    @property
    def control_port(self) -> int | None:
        return self.control.sockets[0].getsockname()[1] if self.control else None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

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
            self.control = await asyncio.start_server(self.control_client, self.host, self.requested_control_port)
        log.info("sim.started", url=self.url, control_port=self.control_port, rate=self.rate, seed=self.seed)

    async def stop(self) -> None:
        for task in [*self.pushers.values(), *self.tasks]:
            task.cancel()
        if self.control is not None:
            self.control.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        log.info("sim.stopped", sent=sum(self.sent.values()))

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # WebSocket protocol.

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if time.monotonic() < self.refuse_until:
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
                self.maybe_stop_pusher(category, topic)

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
            if time.monotonic() < self.stalled_until:
                return
            if self.pong_delay:
                await asyncio.sleep(self.pong_delay)
            if client.category == "private":
                await self.reply(client, {**base, "op": "pong", "args": [str(market.now_ms())]})
            else:
                await self.reply(client, {"success": True, "ret_msg": "pong", **base})
        elif op == "auth" and client.category == "private":
            await self.reply(client, {**base, **self.authenticate(client, msg.get("args"))})
        elif op in ("subscribe", "unsubscribe"):
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
        if not isinstance(args, list) or len(args) != 3:
            return {"success": False, "ret_msg": RET_AUTH_PARAMS}
        key, expires, signature = args
        try:
            expires = int(expires)
        except (TypeError, ValueError):
            return {"success": False, "ret_msg": RET_AUTH_PARAMS}
        now = market.now_ms()
        if expires < now or expires > now + AUTH_MAX_FUTURE_MS:
            return {"success": False, "ret_msg": RET_AUTH_PARAMS}
        secret = self.credentials.get(str(key))
        if secret is None or self.auth_rejected:
            return {"success": False, "ret_msg": RET_AUTH_BAD_KEY}
        expected = hmac.new(secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, str(signature)):
            return {"success": False, "ret_msg": RET_AUTH_BAD_SIGN}
        client.authed = True
        return {"success": True, "ret_msg": ""}

    def subscribe(self, client: Client, args: list[str]) -> dict[str, Any]:
        """Apply a subscribe request whole or not at all; name the first refused topic."""
        if client.category == "spot" and len(args) > SPOT_ARGS_PER_REQUEST:
            return {"success": False, "ret_msg": RET_ARGS_SIZE}
        chars = sum(map(len, client.topics | set(args)))
        if client.category in ("linear", "inverse", "option") and chars > ARGS_CHARS_PER_CONNECTION:
            return {"success": False, "ret_msg": RET_ARGS_LENGTH}
        for topic in args:
            if client.category == "private":
                if topic not in PRIVATE_TOPICS:
                    return {"success": False, "ret_msg": RET_NOT_FOUND.format(topic=topic)}
                if not client.authed:
                    return {"success": False, "ret_msg": RET_NEEDS_AUTH.format(topic=topic)}
            elif not market.topic_valid(client.category, topic, self.symbols):
                return {"success": False, "ret_msg": RET_NOT_FOUND.format(topic=topic)}
            if topic in client.topics:
                return {"success": False, "ret_msg": RET_ALREADY.format(topic=topic)}
        for topic in args:
            client.topics.add(topic)
            self.subscribes[(client.category, topic)] += 1
            if client.category != "private":
                # A running topic greets each new subscriber with a snapshot, as Bybit does.
                snapshot = self.generator(client.category, topic).snapshot()
                if snapshot is not None:
                    self.sent[(client.category, topic)] += 1
                    client.welcome.append(ws_frame(orjson.dumps(snapshot)))
                self.start_pusher(client.category, topic)
        ret_msg = "" if client.category == "private" else RET_SUBSCRIBE_PUBLIC
        return {"success": True, "ret_msg": ret_msg}

    def unsubscribe(self, client: Client, args: list[str]) -> dict[str, Any]:
        for topic in args:
            client.topics.discard(topic)
            self.maybe_stop_pusher(client.category, topic)
        return {"success": True, "ret_msg": "" if client.category == "private" else "unsubscribe"}

    # Market data.

    def generator(self, category: str, topic: str) -> market.Generator:
        key = (category, topic)
        if key not in self.generators:
            self.generators[key] = market.generator_for(category, topic, self.seed)
        return self.generators[key]

    def start_pusher(self, category: str, topic: str) -> None:
        key = (category, topic)
        if self.rate is None:
            if "max" not in self.pushers:
                self.pushers["max"] = asyncio.create_task(self.push_max())  # type: ignore[index]
            return
        if key not in self.pushers:
            self.pushers[key] = asyncio.create_task(self.push(category, topic))

    def maybe_stop_pusher(self, category: str, topic: str) -> None:
        if any(c.category == category and topic in c.topics for c in self.clients):
            return
        task = self.pushers.pop((category, topic), None)
        if task is not None:
            task.cancel()

    def subscribers(self, category: str, topic: str) -> list[Client]:
        return [c for c in self.clients if c.category == category and topic in c.topics]

    def publish(self, category: str, topic: str) -> bytes:
        """The next message of a topic, counted as sent, as a ready WebSocket frame."""
        self.sent[(category, topic)] += 1
        return ws_frame(orjson.dumps(self.generator(category, topic).next()))

    async def push(self, category: str, topic: str) -> None:
        """Bybit's cadence for one topic, scaled by `rate`; skipped while stalled."""
        interval = market.push_interval(category, topic) / (self.rate or 1.0)
        next_at = time.monotonic()
        while True:
            next_at += interval
            if time.monotonic() >= self.stalled_until:
                clients = self.subscribers(category, topic)
                if clients:
                    frame = self.publish(category, topic)
                    for client in clients:
                        client.write(frame)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def push_max(self, batch: int = 256) -> None:
        """As fast as each client reads: frames built in batches, written in one go, flow-controlled."""
        while True:
            if time.monotonic() < self.stalled_until or not self.clients:
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

    # Private events.

    async def emit(self, topic: str, **fields: Any) -> dict[str, Any]:
        """Send one private event to every authed client subscribed to `topic` (or its category form)."""
        n = next(self.private_events)
        item = market.PRIVATE_ITEMS[topic](n, dict(fields))
        message = {"id": f"sim-{n}", "topic": topic, "creationTime": market.now_ms(), "data": [item]}
        category = item.get("category")
        for client in list(self.clients):
            if client.category == "private" and client.authed:
                for subscribed in (topic, f"{topic}.{category}"):
                    if subscribed in client.topics:
                        sent = {**message, "topic": subscribed}
                        self.sent[("private", subscribed)] += 1
                        client.write(ws_frame(orjson.dumps(sent)))
        return message

    async def emit_order(self, **fields: Any) -> dict[str, Any]:
        return await self.emit("order", **fields)

    async def emit_execution(self, **fields: Any) -> dict[str, Any]:
        return await self.emit("execution", **fields)

    async def emit_position(self, **fields: Any) -> dict[str, Any]:
        return await self.emit("position", **fields)

    async def emit_wallet(self, **fields: Any) -> dict[str, Any]:
        return await self.emit("wallet", **fields)

    # Faults.

    async def drop_connections(self, abrupt: bool = False) -> int:
        """Close every connection: a clean close frame, or a TCP abort."""
        clients = list(self.clients)
        for client in clients:
            if abrupt:
                client.ws.transport.abort()
            else:
                await client.ws.close(1001, "simulated restart")
        return len(clients)

    async def stall(self, seconds: float) -> None:
        """Send no data and answer no ping for `seconds`; connections stay open."""
        self.stalled_until = time.monotonic() + seconds

    async def refuse(self, seconds: float) -> None:
        """Answer new connections with HTTP 503 for `seconds`."""
        self.refuse_until = time.monotonic() + seconds

    async def reject_auth(self, on: bool = True) -> None:
        self.auth_rejected = on

    async def delay_pongs(self, seconds: float) -> None:
        self.pong_delay = seconds

    async def send_malformed(self, kind: str, category: str | None = None) -> int:
        """Send one malformed frame of `kind` to every client (of `category` if given)."""
        payloads: dict[str, str | bytes] = {
            "invalid_json": '{"topic": "publicTrade.BTCUSDT", "data": [',
            "binary": b"\x00\x01\x02binary",
            "unknown_topic": '{"topic": "nosuchtopic.BTCUSDT", "type": "snapshot", "ts": 1, "data": {}}',
            "missing_fields": '{"topic": "publicTrade.BTCUSDT", "type": "snapshot", "ts": 1}',
            "wrong_types": '{"topic": 42, "type": "snapshot", "ts": "x", "data": "y"}',
            "oversized": '{"topic": "publicTrade.BTCUSDT", "ts": 1, "data": "' + "x" * (5 * 2**20) + '"}',
        }
        if kind not in payloads:
            raise ValueError(f"unknown malformed kind {kind!r}; use {', '.join(payloads)}")
        payload = payloads[kind]
        sent = 0
        for client in list(self.clients):
            if category is None or client.category == category:
                await client.ws.send(payload)
                sent += 1
        return sent

    async def gap(self, category: str, topic: str) -> None:
        """The next order-book message of `topic` skips one `u`."""
        generator = self.generator(category, topic)
        assert isinstance(generator, market.BookGenerator)
        generator.skip_next = True

    async def restart_book(self, category: str, topic: str) -> None:
        """The next order-book message of `topic` is a fresh snapshot with `u = 1`."""
        generator = self.generator(category, topic)
        assert isinstance(generator, market.BookGenerator)
        generator.restart_next = True

    def stats(self) -> dict[str, Any]:
        return {
            "connections": [
                {"category": c.category, "topics": sorted(c.topics), "authed": c.authed} for c in self.clients
            ],
            "sent": {f"{cat}:{topic}": n for (cat, topic), n in sorted(self.sent.items())},
            "subscribes": {f"{cat}:{topic}": n for (cat, topic), n in sorted(self.subscribes.items())},
            "requests": len(self.requests),
            "refused": self.refused,
        }

    # The control API: minimal HTTP/1.1, one request per connection, JSON in and out.

    async def control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, body = HTTPStatus.OK, b"{}"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            headers = Headers()
            for line in head.decode().split("\r\n")[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip()] = value.strip()
            length = int(headers.get("Content-Length", "0"))
            raw = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
            path = path.split("?")[0]
            if method == "GET" and path == "/control/stats":
                result: Any = self.stats()
            elif method == "POST" and path in self.routes:
                result = await self.routes[path](orjson.loads(raw) if raw.strip() else {})
            else:
                status, result = HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}"}
            body = orjson.dumps({"result": result} if status == HTTPStatus.OK else result)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            status, body = HTTPStatus.BAD_REQUEST, orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()
