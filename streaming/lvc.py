"""The last-value cache: latest book top, merged ticker and latest trade per topic, in Redis.

The gateway's per-frame path only records which value changed (one dict write); a task
writes the changed values to Redis every `interval` seconds, so a busy topic is written at
most once per interval however fast Bybit sends. Redis being away costs nothing but
freshness: values stay marked and are written when it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from streaming.orderbook import OrderBook
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

TTL_SECONDS = 24 * 3600  # a cached value nobody refreshes for a day is gone


def book_key(prefix: str, category: str, symbol: str, depth: int) -> str:
    return f"{prefix}lvc:orderbook:{category}:{symbol}:{depth}"


def ticker_key(prefix: str, category: str, symbol: str) -> str:
    return f"{prefix}lvc:ticker:{category}:{symbol}"


def trade_key(prefix: str, category: str, symbol: str) -> str:
    return f"{prefix}lvc:trade:{category}:{symbol}"


class LastValueCache:
    def __init__(self, client: aioredis.Redis, prefix: str, book_depth: int, interval: float) -> None:
        self.client = client
        self.prefix = prefix
        self.book_depth = book_depth
        self.interval = interval
        self.dirty: dict[str, Callable[[], dict[str, Any]]] = {}
        self.writes = 0
        self.errors = 0
        self.throttle = LogThrottle()

    def book(self, category: str, symbol: str, depth: int, book: OrderBook, exchange_ts: int | None) -> None:
        def render() -> dict[str, Any]:
            bids, asks = book.top(self.book_depth)
            return {"b": bids, "a": asks, "u": book.u, "seq": book.seq, "consistent": book.consistent,
                    "depth": depth, "exchange_ts": exchange_ts}  # fmt: skip

        self.dirty[book_key(self.prefix, category, symbol, depth)] = render

    def ticker(self, category: str, symbol: str, merged: dict[str, Any], exchange_ts: int | None) -> None:
        self.dirty[ticker_key(self.prefix, category, symbol)] = lambda: {"data": merged, "exchange_ts": exchange_ts}

    def trade(self, category: str, symbol: str, trade: dict[str, Any], exchange_ts: int | None) -> None:
        self.dirty[trade_key(self.prefix, category, symbol)] = lambda: {"data": trade, "exchange_ts": exchange_ts}

    async def flush(self) -> int:
        """Write every changed value once; on a Redis error keep them for the next round."""
        if not self.dirty:
            return 0
        batch, self.dirty = self.dirty, {}
        written_at = time.time()
        pipe = self.client.pipeline(transaction=False)
        for key, render in batch.items():
            pipe.set(key, orjson.dumps({**render(), "written_at": written_at}), ex=TTL_SECONDS)
        try:
            await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            self.errors += 1
            batch.update(self.dirty)  # newer marks win over the ones that failed
            self.dirty = batch
            if self.throttle.allow("lvc") is not None:
                log.warning("lvc.write_failed", error=f"{type(exc).__name__}: {exc}"[:200], pending=len(batch))
            return 0
        self.writes += len(batch)
        return len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.flush()
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass
        await self.flush()


async def read(client: aioredis.Redis, key: str) -> dict[str, Any] | None:
    raw = await client.get(key)
    return orjson.loads(raw) if raw else None
