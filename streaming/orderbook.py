"""Local order books from Bybit's snapshot + deltas, with `u` continuity checked. Pure.

Levels live in dicts keyed by the price as a float, so "100.5" and "100.50" are one level.
A float is exact for this: two decimal strings of up to 15 significant digits (every Bybit
price) map to two different floats in the same order, and float hashing and comparison cost a
fraction of Decimal's. Beside each dict, a sorted list of its prices is kept with bisect (a C
memmove, no scan), so the top of the book is a slice.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Any


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


class Books:
    """Every book the gateway keeps, by (socket category, Bybit topic)."""

    def __init__(self) -> None:
        self.books: dict[tuple[str, str], OrderBook] = {}
        self.gaps = 0

    def apply(self, category: str, topic: str, kind: str, data: dict[str, Any]) -> BookUpdate:
        book = self.books.get((category, topic))
        if book is None:
            book = self.books[(category, topic)] = OrderBook()
        update = book.apply(kind, data)
        if update.gap:
            self.gaps += 1
        return update

    def get(self, category: str, topic: str) -> OrderBook | None:
        return self.books.get((category, topic))

    def forget(self, category: str, topic: str) -> None:
        self.books.pop((category, topic), None)
