"""Local books equal Bybit's after any stream of snapshots and deltas; gaps are caught."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.marketstate import MarketState, OrderBook

prices = st.integers(min_value=1, max_value=60).map(lambda i: f"{100 + i * 0.5:.2f}")
sizes = st.one_of(st.just("0"), st.integers(min_value=1, max_value=999).map(lambda i: f"{i / 100:.3f}"))
levels = st.lists(st.tuples(prices, sizes), max_size=8)
messages = st.lists(st.tuples(st.booleans(), levels, levels), min_size=1, max_size=60)


class NaiveBook:
    """The obvious reference: a list of [price, size] pairs, scanned for every level."""

    def __init__(self) -> None:
        self.bids: list[list[str]] = []
        self.asks: list[list[str]] = []

    def apply(self, snapshot: bool, bids: list, asks: list) -> None:
        if snapshot:
            self.bids = [[p, s] for p, s in bids if s != "0"]
            self.asks = [[p, s] for p, s in asks if s != "0"]
            return
        for side, changes in ((self.bids, bids), (self.asks, asks)):
            for price, size in changes:
                found = [level for level in side if Decimal(level[0]) == Decimal(price)]
                for level in found:
                    side.remove(level)
                if size != "0":
                    side.append([price, size])

    def top(self, n: int) -> tuple[list, list]:
        bids = sorted(self.bids, key=lambda level: Decimal(level[0]), reverse=True)[:n]
        asks = sorted(self.asks, key=lambda level: Decimal(level[0]))[:n]
        return [tuple(level) for level in bids], [tuple(level) for level in asks]


def dedupe(changes: list) -> list:
    """Bybit never lists one price twice in a message."""
    return list({p: (p, s) for p, s in changes}.values())


@settings(max_examples=300, deadline=None)
@given(messages, st.integers(min_value=1, max_value=30))
def test_book_matches_a_naive_reference(stream: list, depth: int) -> None:
    book, reference = OrderBook(), NaiveBook()
    for u, (is_snapshot, bids, asks) in enumerate(stream, start=2):
        snapshot = is_snapshot or u == 2
        bids, asks = dedupe(bids), dedupe(asks)
        if snapshot:
            bids, asks = [lv for lv in bids if lv[1] != "0"], [lv for lv in asks if lv[1] != "0"]
        kind = "snapshot" if snapshot else "delta"
        update = book.apply(kind, {"b": bids, "a": asks, "u": u, "seq": u * 10})
        reference.apply(snapshot, bids, asks)
        assert update.consistent
    assert book.top(depth) == reference.top(depth)


def test_price_keys_are_decimal_safe() -> None:
    book = OrderBook()
    book.apply("snapshot", {"b": [["100.5", "1"]], "a": [["101", "1"]], "u": 5})
    book.apply("delta", {"b": [["100.50", "0"]], "a": [], "u": 6})
    assert book.top(5) == ([], [("101", "1")])


def test_a_skipped_update_id_is_a_gap_until_the_next_snapshot() -> None:
    books = MarketState()
    books.book(("linear", "orderbook.50.BTCUSDT"), "snapshot", {"b": [["1", "1"]], "a": [["2", "1"]], "u": 10})
    gap = books.book(("linear", "orderbook.50.BTCUSDT"), "delta", {"b": [], "a": [], "u": 12})
    assert (gap.gap, gap.consistent, gap.expected_u, gap.received_u) == (True, False, 11, 12)
    stale = books.book(("linear", "orderbook.50.BTCUSDT"), "delta", {"b": [], "a": [], "u": 13})
    assert not stale.consistent and not stale.gap
    fresh = books.book(("linear", "orderbook.50.BTCUSDT"), "snapshot", {"b": [], "a": [["3", "1"]], "u": 40})
    assert fresh.consistent and fresh.replaced and books.gaps == 1


def test_u_equal_one_is_a_restart_not_a_gap() -> None:
    book = OrderBook()
    book.apply("snapshot", {"b": [["1", "1"]], "a": [], "u": 500})
    restart = book.apply("delta", {"b": [["5", "2"]], "a": [], "u": 1})
    assert restart.consistent and restart.replaced and not restart.gap
    assert book.top(5) == ([("5", "2")], [])


def test_depth_one_resent_snapshot_with_the_same_u_is_not_a_gap() -> None:
    book = OrderBook()
    for _ in range(3):
        update = book.apply("snapshot", {"b": [["1", "1"]], "a": [["2", "1"]], "u": 77})
        assert update.consistent and not update.gap
