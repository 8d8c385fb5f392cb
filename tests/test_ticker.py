"""Linear/inverse ticker deltas merge into complete tickers."""

from __future__ import annotations

from streaming.tickers import Tickers


def test_deltas_merge_into_the_snapshot() -> None:
    tickers = Tickers()
    tickers.apply("linear", "BTCUSDT", "snapshot", {"symbol": "BTCUSDT", "lastPrice": "100", "fundingRate": "0.01"})
    merged = tickers.apply("linear", "BTCUSDT", "delta", {"symbol": "BTCUSDT", "lastPrice": "101"})
    assert merged == {"symbol": "BTCUSDT", "lastPrice": "101", "fundingRate": "0.01"}


def test_a_snapshot_replaces_and_categories_are_separate() -> None:
    tickers = Tickers()
    tickers.apply("linear", "BTCUSDT", "snapshot", {"lastPrice": "100", "old": "x"})
    tickers.apply("spot", "BTCUSDT", "snapshot", {"lastPrice": "99"})
    assert tickers.apply("linear", "BTCUSDT", "snapshot", {"lastPrice": "102"}) == {"lastPrice": "102"}
    assert tickers.state[("spot", "BTCUSDT")] == {"lastPrice": "99"}
