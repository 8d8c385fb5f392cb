"""The last-value cache: latest book top, merged ticker and latest trade per topic, in Redis.

The gateway's per-frame path only records which value changed (one dict write); a task
writes the changed values to Redis every `interval` seconds (longer when a flush itself took
long: at most a fifth of the loop goes to the cache), so a busy topic is written at most once
per interval however fast Bybit sends. Values live in one hash per kind
(`<prefix>lvc:orderbook`, field `<category>:<symbol>:<depth>`), so a flush is one HSET per
kind, not one command per topic. Redis being away costs nothing but freshness: values stay
marked and are written when it is back. Topics the gateway leaves are removed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from streaming.marketstate import OrderBook
from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

KINDS = ("orderbook", "ticker", "trade", "order", "position")
OPEN_ORDER_STATUSES = frozenset(("New", "PartiallyFilled", "Untriggered"))  # Bybit's open states
ORDER_TIMES_KEPT = 100_000  # orders whose last update time is remembered, so a late older state loses
Key = tuple[str, str]  # (hash name, field)
FLUSH_DUTY_FACTOR = 4


def hash_name(prefix: str, kind: str) -> str:
    return f"{prefix}lvc:{kind}"


def book_key(prefix: str, category: str, symbol: str, depth: int) -> Key:
    return hash_name(prefix, "orderbook"), f"{category}:{symbol}:{depth}"


def ticker_key(prefix: str, category: str, symbol: str) -> Key:
    return hash_name(prefix, "ticker"), f"{category}:{symbol}"


def trade_key(prefix: str, category: str, symbol: str) -> Key:
    return hash_name(prefix, "trade"), f"{category}:{symbol}"


def order_key(prefix: str, order_id: str) -> Key:
    return hash_name(prefix, "order"), order_id


def position_key(prefix: str, category: str, symbol: str, position_idx: Any) -> Key:
    return hash_name(prefix, "position"), f"{category}:{symbol}:{position_idx}"


def keys_of_topic(prefix: str, category: str, topic: str) -> list[Key]:
    """The cached values a Bybit topic feeds, to remove when the gateway leaves it."""
    head, _, rest = topic.partition(".")
    if head == "orderbook":
        depth, _, symbol = rest.partition(".")
        return [book_key(prefix, category, symbol, int(depth))] if depth.isdigit() else []
    if head == "tickers":
        return [ticker_key(prefix, category, rest)]
    if head == "publicTrade":
        return [trade_key(prefix, category, rest)]
    return []


class LastValueCache:
    def __init__(self, client: aioredis.Redis, prefix: str, book_depth: int, interval: float) -> None:
        self.client = client
        self.prefix = prefix
        self.book_depth = book_depth
        self.interval = interval
        self.dirty: dict[Key, Callable[[], dict[str, Any]]] = {}
        self.gone: set[Key] = set()
        self.versions: dict[Key, tuple[int, int]] = {}  # order/position -> (time, seq) last kept
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

    def order(self, item: dict[str, Any]) -> None:
        """An order's newest state: kept while it is open, removed once filled, cancelled or rejected."""
        order_id = item.get("orderId")
        if order_id:
            key = order_key(self.prefix, str(order_id))
            open_ = item.get("orderStatus") in OPEN_ORDER_STATUSES
            self.keep_newest(key, (int(item.get("updatedTime") or 0), 0), item, open_)

    def position(self, item: dict[str, Any]) -> None:
        """A position's newest state: kept while it has a size."""
        if item.get("category") and item.get("symbol"):
            key = position_key(self.prefix, item["category"], item["symbol"], item.get("positionIdx", 0))
            version = (int(item.get("updatedTime") or 0), int(item.get("seq") or 0))
            self.keep_newest(key, version, item, item.get("size") not in ("0", "", None))

    def keep_newest(self, key: Key, version: tuple[int, int], item: dict[str, Any], keep: bool) -> None:
        """Mark `item` (or its removal) unless a newer state of the same key was kept already."""
        if version < self.versions.get(key, (-1, -1)):
            return  # a late copy (a back-fill overlapping the stream) must not undo a newer state
        self.versions[key] = version
        if len(self.versions) > ORDER_TIMES_KEPT:
            for old in list(self.versions)[: ORDER_TIMES_KEPT // 4]:
                del self.versions[old]
        if keep:
            self.gone.discard(key)
            self.dirty[key] = lambda: {"data": item, "exchange_ts": version[0] or None}
        else:
            self.dirty.pop(key, None)
            self.gone.add(key)

    def forget(self, category: str, topic: str) -> None:
        """The gateway left this topic: its cached values go at the next flush."""
        for key in keys_of_topic(self.prefix, category, topic):
            self.dirty.pop(key, None)
            self.gone.add(key)

    async def flush(self) -> int:
        """Write every changed value once; on a Redis error keep them for the next round."""
        if not self.dirty and not self.gone:
            return 0
        batch, self.dirty = self.dirty, {}
        gone, self.gone = self.gone, set()
        written_at = time.time()
        by_hash: dict[str, dict[str, bytes]] = {}
        for (name, field), render in batch.items():
            by_hash.setdefault(name, {})[field] = orjson.dumps({**render(), "written_at": written_at})
        pipe = self.client.pipeline(transaction=False)
        for name, mapping in by_hash.items():
            pipe.hset(name, mapping=mapping)
        for name, field in gone:
            pipe.hdel(name, field)
        try:
            await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            self.errors += 1
            batch.update(self.dirty)  # newer marks win over the ones that failed
            self.dirty = batch
            self.gone |= gone
            if self.throttle.allow("lvc") is not None:
                log.warning("lvc.write_failed", error=f"{type(exc).__name__}: {exc}"[:200], pending=len(batch))
            return 0
        self.writes += len(batch)
        return len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await self.flush()
            # Under load a flush renders hundreds of books: then wait longer, so the cache never
            # takes more than 1/(1 + FLUSH_DUTY_FACTOR) of the loop from the event path.
            spent = time.perf_counter() - started
            try:
                await asyncio.wait_for(stop.wait(), max(self.interval, spent * FLUSH_DUTY_FACTOR))
            except TimeoutError:
                pass
        await self.flush()
