"""A plain `websockets` client for the simulator tests, speaking Bybit's JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from streaming.simulator import Simulator
from tests.conftest import TIMEOUT_FACTOR


def with_simulator(test: Callable[[Simulator], Awaitable[None]], **options: Any) -> None:
    """Run an async test against a fresh in-process simulator on port 0."""

    async def main() -> None:
        async with Simulator(**options) as sim:
            await test(sim)

    asyncio.run(main())


class BybitClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> BybitClient:
        return cls(await connect(url, ping_interval=None, max_size=None, compression=None))

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout * TIMEOUT_FACTOR))

    async def reply(self, op: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The next control reply (skipping data frames), optionally of one op."""
        while True:
            message = await self.recv(timeout)
            if "topic" in message:
                continue
            if op is None or message.get("op") == op:
                return message

    async def data(self, topic: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        frames = []
        while len(frames) < count:
            message = await self.recv(timeout)
            if message.get("topic") == topic:
                frames.append(message)
        return frames

    async def request(self, op: str, args: list[Any] | None = None, req_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"op": op}
        if args is not None:
            body["args"] = args
        if req_id is not None:
            body["req_id"] = req_id
        await self.send(body)
        return await self.reply(op if op != "ping" else None)

    async def close(self) -> None:
        await self.ws.close()
