"""The Bybit simulator's control surface: private events and faults, and the plain-HTTP API that sets them off.

The API listens on its own port, one request per connection, JSON in and out:

    POST /control/orders {"symbol": "BTCUSDT", ...}   (also /executions /positions /wallet)
    POST /control/faults/drop {"abrupt": false}       POST /control/faults/stall {"seconds": 3}
    POST /control/faults/refuse {"seconds": 3, "path": "/v5/public/linear"}  (path optional: all by default)
    POST /control/faults/reject_auth {"on": true}     POST /control/faults/ignore_requests {"seconds": 3}
    POST /control/faults/delay_pongs {"seconds": 1}   POST /control/faults/malformed {"kind": "invalid_json"}
    POST /control/faults/late {"ms": 2000, "seconds": 3}
    (malformed kinds `order_without_category` and `wallet_without_account_type` go to private clients)
    POST /control/faults/gap {"category": "linear", "topic": "orderbook.50.BTCUSDT"}
    POST /control/faults/restart_book {...same...}    GET /control/stats
    POST /control/faults/rest {"mode": "error", "count": 2, "seconds": 0}
    POST /control/rest/limits {"limits": {"/v5/execution/list": 2}, "window": 1.0}
    GET /control/ledger?topic=order&after=0

The same port serves Bybit's REST endpoints for private state under /v5/ (`rest.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from websockets.datastructures import Headers

from streaming.simulator import market, private

if TYPE_CHECKING:
    from streaming.simulator.server import Simulator

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

PRIVATE_KINDS = ("order_without_category", "wallet_without_account_type")
# Private frames with one bad item among good ones (kinds `order_without_category` and
# `wallet_without_account_type`): fixed content, so a test can compare what arrives.
AT = "1700000000000"
PARTLY_BAD_ORDERS: dict[str, Any] = {
    "id": "sim-partly-bad-orders",
    "topic": "order",
    "creationTime": int(AT),
    "data": [
        private.order_item(0, 0, {"orderId": "sim-good-1", "createdTime": AT, "updatedTime": AT}, None),
        {k: v for k, v in private.order_item(0, 0, {"orderId": "sim-bad", "createdTime": AT, "updatedTime": AT},
                                             None).items() if k != "category"},
        private.order_item(0, 0, {"orderId": "sim-good-2", "symbol": "ETHUSDT", "createdTime": AT,
                                  "updatedTime": AT}, None),
    ],
}  # fmt: skip
PARTLY_BAD_WALLET: dict[str, Any] = {
    "id": "sim-partly-bad-wallet",
    "topic": "wallet",
    "creationTime": int(AT),
    "data": [
        private.wallet_item(0, 0, {}, None),
        {k: v for k, v in private.wallet_item(0, 0, {"totalEquity": "1"}, None).items() if k != "accountType"},
    ],
}


class Control:
    """What a test or an operator does to a running simulator, as methods and over HTTP."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.listener: asyncio.Server | None = None
        self.routes: dict[str, Handler] = {
            "/control/orders": lambda b: self.emit("order", **b),
            "/control/executions": lambda b: self.emit("execution", **b),
            "/control/positions": lambda b: self.emit("position", **b),
            "/control/wallet": lambda b: self.emit("wallet", **b),
            "/control/faults/drop": lambda b: self.drop_connections(bool(b.get("abrupt"))),
            "/control/faults/stall": lambda b: self.stall(float(b.get("seconds", 5))),
            "/control/faults/refuse": lambda b: self.refuse(float(b.get("seconds", 5)), str(b.get("path", ""))),
            "/control/faults/reject_auth": lambda b: self.reject_auth(bool(b.get("on", True))),
            "/control/faults/ignore_requests": lambda b: self.ignore_requests(float(b.get("seconds", 5))),
            "/control/faults/delay_pongs": lambda b: self.delay_pongs(float(b.get("seconds", 1))),
            "/control/faults/late": lambda b: self.late(int(b.get("ms", 2000)), float(b.get("seconds", 3))),
            "/control/faults/malformed": lambda b: self.send_malformed(
                b.get("kind", "invalid_json"), b.get("category")
            ),
            "/control/faults/gap": lambda b: self.gap(b["category"], b["topic"]),
            "/control/faults/restart_book": lambda b: self.restart_book(b["category"], b["topic"]),
            "/control/faults/rest": lambda b: self.rest_fault(b["mode"], int(b.get("count", 1)), b.get("seconds", 0)),
            "/control/rest/limits": lambda b: self.rest_limits(b.get("limits"), b.get("window")),
        }

    @property
    def port(self) -> int | None:
        return self.listener.sockets[0].getsockname()[1] if self.listener else None

    async def start(self, host: str, port: int) -> None:
        self.listener = await asyncio.start_server(self.handle, host, port)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()

    # Private events.

    async def emit(self, topic: str, **fields: Any) -> dict[str, Any]:
        """Keep one private event (store and ledger), then send it to the authed clients subscribed to its topic."""
        message = self.simulator.private.emit(topic, fields)
        self.simulator.feed.send_private(message, message["data"][0].get("category"))
        return message

    def ledger(self, topic: str | None = None, after: int = 0) -> list[private.LedgerEntry]:
        """Every private item emitted after number `after`, of one topic if given, in the order emitted."""
        return [e for e in self.simulator.private.ledger if e["n"] > after and (topic is None or e["topic"] == topic)]

    def stats(self) -> dict[str, Any]:
        """Connections and their topics; messages sent, subscribes, private events and REST answers counted."""
        sim = self.simulator
        return {
            "connections": [
                {"category": c.category, "topics": sorted(c.topics), "authed": c.authed} for c in sim.clients
            ],
            "sent": {f"{cat}:{topic}": n for (cat, topic), n in sorted(sim.sent.items())},
            "subscribes": {f"{cat}:{topic}": n for (cat, topic), n in sorted(sim.subscribes.items())},
            "requests": len(sim.requests),
            "refused": sim.refused,
            "private": len(sim.private.ledger),
            "rest": {f"{path}:{code}": n for (path, code), n in sorted(sim.rest.answered.items())},
        }

    # Faults.

    async def drop_connections(self, abrupt: bool = False) -> int:
        """Close every connection: a clean close frame, or a TCP abort."""
        clients = list(self.simulator.clients)
        for client in clients:
            if abrupt:
                client.ws.transport.abort()
            else:
                await client.ws.close(1001, "simulated restart")
        return len(clients)

    async def stall(self, seconds: float) -> None:
        """Send no data and answer no ping for `seconds`; connections stay open.

        Private events emitted meanwhile are held up and arrive when the stall ends, on the
        connections still open then: a client that gave up on a silent socket never gets them.
        """
        self.simulator.faults.stalled_until = time.monotonic() + seconds
        asyncio.get_running_loop().call_later(seconds, self.simulator.feed.release_held)

    async def late(self, ms: int, seconds: float) -> None:
        """For `seconds`, stamp market frames `ms` in the past: what a client reading far behind sees."""
        self.simulator.faults.late_ms = ms
        self.simulator.faults.late_until = time.monotonic() + seconds

    async def refuse(self, seconds: float, path: str = "") -> None:
        """Answer new connections (to `path` only, if given) with HTTP 503 for `seconds`."""
        self.simulator.faults.refuse_until = time.monotonic() + seconds
        self.simulator.faults.refuse_path = path

    async def ignore_requests(self, seconds: float) -> None:
        """Neither apply nor answer subscribe/unsubscribe requests for `seconds`; pings are still answered."""
        self.simulator.faults.ignore_requests_until = time.monotonic() + seconds

    async def reject_auth(self, on: bool = True) -> None:
        self.simulator.faults.auth_rejected = on

    async def delay_pongs(self, seconds: float) -> None:
        self.simulator.faults.pong_delay = seconds

    async def send_malformed(self, kind: str, category: str | None = None) -> int:
        """Send one malformed frame of `kind` to every client (of `category` if given; private kinds: "private")."""
        payloads: dict[str, str | bytes] = {
            "invalid_json": '{"topic": "publicTrade.BTCUSDT", "data": [',
            "binary": b"\x00\x01\x02binary",
            "invalid_utf8": b'{"topic": "publicTrade.BTCUSDT", "data": "\xc3"}',  # sent as a text frame
            "unknown_topic": '{"topic": "nosuchtopic.BTCUSDT", "type": "snapshot", "ts": 1, "data": {}}',
            "missing_fields": '{"topic": "publicTrade.BTCUSDT", "type": "snapshot", "ts": 1}',
            "wrong_types": '{"topic": 42, "type": "snapshot", "ts": "x", "data": "y"}',
            "oversized": '{"topic": "publicTrade.BTCUSDT", "ts": 1, "data": "' + "x" * (5 * 2**20) + '"}',
            "order_without_category": orjson.dumps(PARTLY_BAD_ORDERS).decode(),
            "wallet_without_account_type": orjson.dumps(PARTLY_BAD_WALLET).decode(),
        }
        if kind not in payloads:
            raise ValueError(f"unknown malformed kind {kind!r}; use {', '.join(payloads)}")
        payload = payloads[kind]
        if kind in PRIVATE_KINDS:
            category = "private"
        sent = 0
        for client in list(self.simulator.clients):
            if category is None or client.category == category:
                await client.ws.send(payload, text=True if kind == "invalid_utf8" else None)
                sent += 1
        return sent

    async def gap(self, category: str, topic: str) -> None:
        """The next order-book message of `topic` skips one `u`."""
        generator = self.simulator.feed.generator(category, topic)
        assert isinstance(generator, market.BookGenerator)
        generator.skip_next = True

    async def restart_book(self, category: str, topic: str) -> None:
        """The next order-book message of `topic` is a fresh snapshot with `u = 1`."""
        generator = self.simulator.feed.generator(category, topic)
        assert isinstance(generator, market.BookGenerator)
        generator.restart_next = True

    async def rest_fault(self, mode: str, count: int = 1, seconds: float = 0.0) -> None:
        """The next `count` REST requests fail: retCode 10016 (`error`), HTTP 502 (`http_5xx`), or `stall` s late."""
        self.simulator.rest.fail(mode, count, float(seconds))

    async def rest_limits(self, limits: dict[str, int] | None = None, window: float | None = None) -> dict[str, Any]:
        """Set REST requests allowed per `window` s per endpoint (Bybit: 50 per 1 s); counts start afresh."""
        return self.simulator.rest.set_limits(limits, None if window is None else float(window))

    # The HTTP API: minimal HTTP/1.1, one request per connection.

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, headers, raw = await read_request(reader)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        path, _, query = target.partition("?")
        if path.startswith("/v5/"):
            status, extra, body = await self.simulator.rest.handle(method, path, query, headers)
        else:
            status, body = await self.control_request(method, path, query, raw)
            extra = {"Content-Type": "application/json"}
        head = "".join(f"{name}: {value}\r\n" for name, value in extra.items())
        writer.write(
            f"HTTP/1.1 {status.value} {status.phrase}\r\n{head}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the client gave up (a stalled REST answer outlived its timeout)
        writer.close()

    async def control_request(self, method: str, path: str, query: str, raw: bytes) -> tuple[HTTPStatus, bytes]:
        status = HTTPStatus.OK
        try:
            params = dict(parse_qsl(query))
            if method == "GET" and path == "/control/stats":
                result: Any = self.simulator.stats()
            elif method == "GET" and path == "/control/ledger":
                result = self.ledger(params.get("topic"), int(params.get("after", 0)))
            elif method == "POST" and path in self.routes:
                result = await self.routes[path](orjson.loads(raw) if raw.strip() else {})
            else:
                status, result = HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}"}
            return status, orjson.dumps({"result": result} if status == HTTPStatus.OK else result)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return HTTPStatus.BAD_REQUEST, orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, Headers, bytes]:
    """(method, target, headers, body) of one HTTP/1.1 request; raises ValueError on a malformed head."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = Headers()
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip()] = value.strip()
    length = int(headers.get("Content-Length", "0"))
    raw = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return method, target, headers, raw
