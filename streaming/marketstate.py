"""Market state the gateway keeps per topic: order books, merged tickers, cache marks, balance rows.

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
"""

from __future__ import annotations

import time
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streaming.balances import rows_from_wallet

if TYPE_CHECKING:
    from streaming.balances import BalanceWriter
    from streaming.envelope import DataFrame
    from streaming.lvc import LastValueCache


@dataclass(frozen=True, slots=True)
class BookUpdate:
    """What one message did to the book."""

    consistent: bool  # the local book equals Bybit's after this message
    gap: bool = False  # a `u` was skipped: the book is stale until the next snapshot
    expected_u: int | None = None
    received_u: int | None = None
    replaced: bool = False  # a snapshot (or Bybit's u=1 restart) replaced the book


class OrderBook:
    __slots__ = ("ask_prices", "asks", "bid_prices", "bids", "consistent", "seq", "u")

    def __init__(self) -> None:
        # price -> [price as Bybit wrote it, size]: the top of the book renders with no conversion.
        self.bids: dict[float, list[str]] = {}
        self.asks: dict[float, list[str]] = {}
        self.bid_prices: list[float] = []  # ascending, like ask_prices
        self.ask_prices: list[float] = []
        self.u: int | None = None
        self.seq: int | None = None
        self.consistent = False

    def apply(self, kind: str, data: dict[str, Any]) -> BookUpdate:
        """Apply one message; a gap leaves the book inconsistent until a snapshot arrives."""
        u = data["u"]
        if kind == "snapshot" or u == 1:
            self.bids = {float(p): [p, s] for p, s in data["b"]}
            self.asks = {float(p): [p, s] for p, s in data["a"]}
            self.bid_prices, self.ask_prices = sorted(self.bids), sorted(self.asks)
            self.u, self.seq, self.consistent = u, data.get("seq"), True
            return BookUpdate(True, replaced=True)
        if not self.consistent:
            return BookUpdate(False)
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
                    side[key][1] = size
                else:
                    insort(prices, key)
                    side[key] = [price, size]
        self.u, self.seq = u, data.get("seq")
        return BookUpdate(True)

    def top(self, n: int) -> tuple[list[list[str]], list[list[str]]]:
        """The best `n` levels a side, as Bybit writes them: bids high to low, asks low to high.

        The levels are the book's own lists, not copies: serialize them before the next apply.
        """
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

    def book(self, category: str, topic: str, kind: str, data: dict[str, Any]) -> BookUpdate:
        """Apply one order-book message; the topic's book is created by its first message."""
        book = self.books.get((category, topic))
        if book is None:
            book = self.books[(category, topic)] = OrderBook()
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
