"""Market state the gateway keeps per topic (books, merged tickers, cache marks, balance rows) and its cache in Redis.

`MarketState` is the one place where a topic's state is created (its first book message or
ticker) and the one place where it is forgotten (the gateway leaves the topic). It is pure
apart from handing marks to the last-value cache and rows to the balance writer, which only
queue them: their own tasks do the I/O.

Order books come from Bybit's snapshot + deltas, with `u` continuity checked. Levels live in
dicts keyed by the price as a float, so "100.5" and "100.50" are one level. A float is exact
for this: two decimal strings of up to 15 significant digits (every Bybit price) map to two
different floats in the same order, and float hashing and comparison cost a fraction of
Decimal's. Beside each dict, a sorted list of its prices is kept with bisect (a C memmove,
no scan), so the top of the book is a slice.

`LastValueCache`: the latest book top, merged ticker and latest trade per topic, in Redis.

The gateway's per-frame path only records which value changed (one dict write); a task
writes the changed values to Redis every `interval` seconds (longer when a flush itself took
long: at most a tenth of the loop goes to the cache), so a busy topic is written at most once
per interval however fast Bybit sends. Values live in one hash per kind
(`<prefix>lvc:orderbook`, field `<category>:<symbol>:<depth>`), so a flush is one HSET per
kind, not one command per topic. Redis being away costs nothing but freshness: values stay
marked and are written when it is back. Topics the gateway leaves are removed.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
import structlog

from streaming.balances import rows_from_wallet
from wsgateway.logging import LogThrottle

if TYPE_CHECKING:
    from streaming.balances import BalanceWriter
    from streaming.envelope import DataFrame
    from streaming.publisher import Pacing

log = structlog.get_logger(__name__)

KINDS = ("orderbook", "ticker", "trade", "order", "position")
ACCOUNT_KINDS = frozenset(("order", "position"))  # the private topics whose state the cache keeps, by kind
OPEN_ORDER_STATUSES = frozenset(("New", "PartiallyFilled", "Untriggered"))  # Bybit's open states
ORDER_TIMES_KEPT = 100_000  # orders whose last update time is remembered, so a late older state loses
Key = tuple[str, str]  # (hash name, field)
# A flush waits this many times its own duration before the next: the cache takes at most a
# tenth of the loop. A fifth (4) cost bench (b) 15% more CPU per event (200 books, each
# rendered at every flush) for a cache written every 6-16 ms instead of 14-36 ms.
FLUSH_DUTY_FACTOR = 9


@dataclass(frozen=True, slots=True)
class BookUpdate:
    """What one message did to the book."""

    consistent: bool  # the local book equals Bybit's after this message
    gap: bool = False  # a `u` was skipped: the book is stale until the next snapshot
    expected_u: int | None = None
    received_u: int | None = None
    replaced: bool = False  # a snapshot (or Bybit's u=1 restart) replaced the book


# The outcomes that carry no detail, made once: a book update is the most frequent message there is.
APPLIED = BookUpdate(True)
REPLACED = BookUpdate(True, replaced=True)
WAITING = BookUpdate(False)  # inconsistent since a gap: nothing applies until a snapshot
RESYNCING = BookUpdate(False)  # the same, while the gateway resyncs it far behind: the delta is dropped


class OrderBook:
    __slots__ = ("ask_prices", "asks", "bid_prices", "bids", "consistent", "seq", "shed_at", "shedding", "u")

    def __init__(self) -> None:
        # price -> (price as Bybit wrote it, size): the top of the book renders with no conversion.
        # Tuples, not lists: the collector stops tracking a tuple of strings, so tens of thousands
        # of levels are not walked by every collection (a full one: 46 -> 32 ms, 200 books).
        self.bids: dict[float, tuple[str, str]] = {}
        self.asks: dict[float, tuple[str, str]] = {}
        self.bid_prices: list[float] = []  # ascending, like ask_prices
        self.ask_prices: list[float] = []
        self.u: int | None = None
        self.seq: int | None = None
        self.consistent = False
        # Far behind, the gateway drops the book's deltas until a fresh snapshot (Gateway.shed).
        self.shedding = False
        self.shed_at = -(1 << 62)  # ms: when it last did

    def apply(self, kind: str, data: dict[str, Any]) -> BookUpdate:
        """Apply one message; a gap leaves the book inconsistent until a snapshot arrives."""
        u = data["u"]
        if kind == "snapshot" or u == 1:
            self.bids = {float(p): (p, s) for p, s in data["b"]}
            self.asks = {float(p): (p, s) for p, s in data["a"]}
            self.bid_prices, self.ask_prices = sorted(self.bids), sorted(self.asks)
            self.u, self.seq, self.consistent, self.shedding = u, data.get("seq"), True, False
            return REPLACED
        if not self.consistent:
            return RESYNCING if self.shedding else WAITING
        if u != self.u + 1:  # type: ignore[operator]
            self.consistent = False
            return BookUpdate(False, gap=True, expected_u=self.u + 1, received_u=u)  # type: ignore[operator]
        for side, prices, levels in ((self.bids, self.bid_prices, data["b"]), (self.asks, self.ask_prices, data["a"])):
            for price, size in levels:
                key = float(price)
                if float(size) == 0:
                    if side.pop(key, None) is not None:
                        del prices[bisect_left(prices, key)]
                elif key in side:
                    side[key] = (price, size)
                else:
                    insort(prices, key)
                    side[key] = (price, size)
        self.u, self.seq = u, data.get("seq")
        return APPLIED

    def top(self, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The best `n` (price, size) levels a side, as Bybit writes them: bids high to low, asks low to high."""
        bids = self.bid_prices[: -n - 1 : -1] if n else []
        asks = self.ask_prices[:n]
        bid_levels, ask_levels = self.bids, self.asks
        return [bid_levels[p] for p in bids], [ask_levels[p] for p in asks]


class MarketState:
    """Books, merged tickers and the cache and balance marks of every topic the gateway holds."""

    def __init__(self, cache: LastValueCache | None = None, balances: BalanceWriter | None = None) -> None:
        self.books: dict[tuple[str, str], OrderBook] = {}  # (socket category, Bybit topic)
        self.tickers: dict[tuple[str, str], dict[str, Any]] = {}  # (category, symbol)
        self.cache = cache
        self.balances = balances
        self.gaps = 0
        self.repairs = 0

    def book(self, key: tuple[str, str], kind: str, data: dict[str, Any]) -> BookUpdate:
        """Apply one order-book message to the book of `key` (category, topic), made by its first message."""
        book = self.books.get(key)
        if book is None:
            book = self.books[key] = OrderBook()
        update = book.apply(kind, data)
        if update.gap:
            self.gaps += 1
        return update

    def ticker(self, category: str, symbol: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Merge one ticker message and return the complete ticker (a snapshot replaces it).

        Linear and inverse tickers send only the changed fields after their snapshot.
        """
        key = (category, symbol)
        merged = self.tickers.get(key)
        if kind == "snapshot" or merged is None:
            merged = self.tickers[key] = dict(data)
        else:
            merged.update(data)
        return merged

    def keep(self, frame: DataFrame) -> bool:
        """Mark what the cache and the balance writer need from a data frame.

        Return True when the frame's order book skipped a `u`: the topic needs a fresh snapshot.
        """
        msg = frame.parsed
        ts = msg.get("ts")
        if frame.event_class == "orderbook":
            book = self.books.get((frame.category, frame.topic))
            if book is not None and self.cache is not None:
                self.cache.book(frame.category, frame.symbol, int(frame.param), book, ts)
            if frame.gap:
                self.repairs += 1
            return frame.gap
        if frame.event_class == "ticker" and frame.merged is not None and self.cache is not None:
            self.cache.ticker(frame.category, frame.symbol, frame.merged, ts)
        elif frame.event_class == "trade" and self.cache is not None:
            trades = msg.get("data")
            if isinstance(trades, list) and trades:
                self.cache.trade(frame.category, frame.symbol, trades[-1], ts)
        elif frame.event_class in ("order", "position") and self.cache is not None:
            keep = self.cache.order if frame.event_class == "order" else self.cache.position
            for item in msg["data"]:
                if isinstance(item, dict):
                    keep(item)
        elif frame.event_class == "balance" and self.balances is not None:
            for item in msg["data"]:
                for row in rows_from_wallet(item, msg.get("creationTime") or int(time.time() * 1000)):
                    self.balances.offer(row)
        return False

    def forget(self, category: str, topics: set[str]) -> None:
        """The gateway left these topics: drop their books, tickers and cached values."""
        for topic in topics:
            self.books.pop((category, topic), None)
            head, _, symbol = topic.partition(".")
            if head == "tickers":
                self.tickers.pop((category, symbol), None)
            if self.cache is not None:
                self.cache.forget(category, topic)

    def snapshot(self) -> dict[str, int]:
        return {"kept": len(self.books), "gaps": self.gaps, "repairs": self.repairs}


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


class BookMark:
    """One book's entry in the cache: its key, and how to render its top at the next flush."""

    __slots__ = ("book", "cache", "depth", "exchange_ts", "key")

    def __init__(self, key: Key, book: OrderBook, depth: int, cache: LastValueCache) -> None:
        self.key, self.book, self.depth, self.cache = key, book, depth, cache
        self.exchange_ts: int | None = None  # of the last message applied

    def render(self) -> dict[str, Any]:
        book = self.book
        bids, asks = book.top(self.cache.book_depth)
        return {"b": bids, "a": asks, "u": book.u, "seq": book.seq, "consistent": book.consistent,
                "depth": self.depth, "exchange_ts": self.exchange_ts}  # fmt: skip


class LastValueCache:
    def __init__(self, client: aioredis.Redis, prefix: str, book_depth: int, interval: float) -> None:
        self.client = client
        self.prefix = prefix
        self.book_depth = book_depth
        self.interval = interval
        self.dirty: dict[Key, Callable[[], dict[str, Any]]] = {}
        self.gone: set[Key] = set()
        self.cleared: set[str] = set()  # whole hashes to delete at the next flush (the account state left)
        self.versions: dict[Key, tuple[int, int]] = {}  # order/position -> (time, seq) last kept
        self.book_marks: dict[OrderBook, BookMark] = {}
        self.writes = 0
        self.errors = 0
        self.throttle = LogThrottle()

    def book(self, category: str, symbol: str, depth: int, book: OrderBook, exchange_ts: int | None) -> None:
        # Once per frame of every book: the mark (its key, its render) is made once per book.
        mark = self.book_marks.get(book)
        if mark is None:
            mark = self.book_marks[book] = BookMark(book_key(self.prefix, category, symbol, depth), book, depth, self)
        mark.exchange_ts = exchange_ts
        self.dirty[mark.key] = mark.render

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
        """The gateway left this topic: its cached values go at the next flush.

        Leaving the private `order` or `position` topic clears the whole account hash: nothing
        would tell the cache an order filled meanwhile, so an open order kept would become a lie.
        """
        if topic in ACCOUNT_KINDS:
            name = hash_name(self.prefix, topic)
            self.cleared.add(name)
            self.dirty = {key: render for key, render in self.dirty.items() if key[0] != name}
            self.gone = {key for key in self.gone if key[0] != name}
            self.versions = {key: version for key, version in self.versions.items() if key[0] != name}
            return
        for key in keys_of_topic(self.prefix, category, topic):
            self.dirty.pop(key, None)
            self.gone.add(key)
            self.book_marks = {book: mark for book, mark in self.book_marks.items() if mark.key != key}

    async def held(self, kind: str) -> set[str]:
        """The fields of an account hash (`order`, `position`) the cache holds: in Redis, or marked, not yet flushed."""
        name = hash_name(self.prefix, kind)
        fields = set() if name in self.cleared else {f.decode() for f in await self.client.hkeys(name)}
        fields |= {field for hash_, field in self.dirty if hash_ == name}
        return fields - {field for hash_, field in self.gone if hash_ == name}

    async def flush(self) -> int:
        """Write every changed value once; on a Redis error keep them for the next round."""
        if not self.dirty and not self.gone and not self.cleared:
            return 0
        batch, self.dirty = self.dirty, {}
        gone, self.gone = self.gone, set()
        cleared, self.cleared = self.cleared, set()
        written_at = time.time()
        by_hash: dict[str, dict[str, bytes]] = {}
        for (name, field), render in batch.items():
            by_hash.setdefault(name, {})[field] = orjson.dumps({**render(), "written_at": written_at})
        pipe = self.client.pipeline(transaction=False)
        for name in cleared:  # first: a value marked after the clear is newer and stays
            pipe.delete(name)
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
            self.cleared |= cleared
            if self.throttle.allow("lvc") is not None:
                log.warning("lvc.write_failed", error=f"{type(exc).__name__}: {exc}"[:200], pending=len(batch))
            return 0
        self.writes += len(batch)
        return len(batch)

    async def run(self, stop: asyncio.Event, pacing: Pacing | None = None) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await self.flush()
            # Under load a flush renders hundreds of books: then wait longer, so the cache never
            # takes more than 1/(1 + FLUSH_DUTY_FACTOR) of the loop from the event path. While
            # the gateway reads late, it is written once per pacing interval: no fresher than
            # what consumers are given, and the CPU goes to reading the sockets.
            wait = max(self.interval, (time.perf_counter() - started) * FLUSH_DUTY_FACTOR)
            if pacing is not None and pacing.behind:
                wait = max(wait, pacing.interval_ms / 1000)
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
        await self.flush()
