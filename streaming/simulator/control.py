"""The Bybit simulator's control surface: private events and faults, and the plain-HTTP API that sets them off.

The API listens on its own port, one request per connection, JSON in and out:

    POST /control/orders {"symbol": "BTCUSDT", ...}   (also /executions /positions /wallet)
    POST /control/faults/drop {"abrupt": false}       POST /control/faults/stall {"seconds": 3}
    POST /control/faults/refuse {"seconds": 3}        POST /control/faults/reject_auth {"on": true}
    POST /control/faults/delay_pongs {"seconds": 1}   POST /control/faults/malformed {"kind": "invalid_json"}
    (malformed kinds `order_without_category` and `wallet_without_account_type` go to private clients)
    POST /control/faults/gap {"category": "linear", "topic": "orderbook.50.BTCUSDT"}
    POST /control/faults/restart_book {...same...}    GET /control/stats
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

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
        private.order_item(0, {"orderId": "sim-good-1", "createdTime": AT, "updatedTime": AT}),
        {k: v for k, v in private.order_item(0, {"orderId": "sim-bad", "createdTime": AT, "updatedTime": AT}).items()
         if k != "category"},
        private.order_item(0, {"orderId": "sim-good-2", "symbol": "ETHUSDT", "createdTime": AT, "updatedTime": AT}),
    ],
}  # fmt: skip
PARTLY_BAD_WALLET: dict[str, Any] = {
    "id": "sim-partly-bad-wallet",
    "topic": "wallet",
    "creationTime": int(AT),
    "data": [
        private.wallet_item(0, {}),
        {k: v for k, v in private.wallet_item(0, {"totalEquity": "1"}).items() if k != "accountType"},
    ],
}


class Control:
    """What a test or an operator does to a running simulator, as methods and over HTTP."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.private_events = itertools.count(1)
        self.listener: asyncio.Server | None = None
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
        """Send one private event to every authed client subscribed to `topic` (or its category form)."""
        n = next(self.private_events)
        item = private.PRIVATE_ITEMS[topic](n, dict(fields))
        message = {"id": f"sim-{n}", "topic": topic, "creationTime": market.now_ms(), "data": [item]}
        self.simulator.feed.send_private(message, item.get("category"))
        return message

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
        """Send no data and answer no ping for `seconds`; connections stay open."""
        self.simulator.faults.stalled_until = time.monotonic() + seconds

    async def refuse(self, seconds: float) -> None:
        """Answer new connections with HTTP 503 for `seconds`."""
        self.simulator.faults.refuse_until = time.monotonic() + seconds

    async def reject_auth(self, on: bool = True) -> None:
        self.simulator.faults.auth_rejected = on

    async def delay_pongs(self, seconds: float) -> None:
        self.simulator.faults.pong_delay = seconds

    async def send_malformed(self, kind: str, category: str | None = None) -> int:
        """Send one malformed frame of `kind` to every client (of `category` if given; private kinds: "private")."""
        payloads: dict[str, str | bytes] = {
            "invalid_json": '{"topic": "publicTrade.BTCUSDT", "data": [',
            "binary": b"\x00\x01\x02binary",
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
                await client.ws.send(payload)
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

    # The HTTP API: minimal HTTP/1.1, one request per connection.

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
                result: Any = self.simulator.stats()
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
