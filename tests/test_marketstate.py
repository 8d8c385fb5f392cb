"""Market state alone: tickers merge, books mark the cache, wallets queue rows, leaving forgets."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import redis.asyncio as aioredis

from streaming.balances import BalanceWriter
from streaming.envelope import DataFrame, Envelopes
from streaming.marketstate import LastValueCache, MarketState, book_key, ticker_key, trade_key
from streaming.publisher import Pacing

BOOK = "orderbook.50.BTCUSDT"


def market_state() -> MarketState:
    """A state whose cache and balance writer only queue: neither connects until it flushes."""
    cache = LastValueCache(aioredis.from_url("redis://127.0.0.1:6379"), "p:", book_depth=5, interval=1.0)
    return MarketState(cache, BalanceWriter("dbname=unused"))


def feed(state: MarketState, frame: dict, category: str = "linear") -> DataFrame:
    result = Envelopes("r", state).handle(orjson.dumps(frame).decode(), category)
    assert isinstance(result, DataFrame), result
    return result


def test_deltas_merge_into_the_snapshot() -> None:
    tickers = MarketState()
    tickers.ticker("linear", "BTCUSDT", "snapshot", {"symbol": "BTCUSDT", "lastPrice": "100", "fundingRate": "0.01"})
    merged = tickers.ticker("linear", "BTCUSDT", "delta", {"symbol": "BTCUSDT", "lastPrice": "101"})
    assert merged == {"symbol": "BTCUSDT", "lastPrice": "101", "fundingRate": "0.01"}


def test_a_snapshot_replaces_and_categories_are_separate() -> None:
    tickers = MarketState()
    tickers.ticker("linear", "BTCUSDT", "snapshot", {"lastPrice": "100", "old": "x"})
    tickers.ticker("spot", "BTCUSDT", "snapshot", {"lastPrice": "99"})
    assert tickers.ticker("linear", "BTCUSDT", "snapshot", {"lastPrice": "102"}) == {"lastPrice": "102"}
    assert tickers.tickers[("spot", "BTCUSDT")] == {"lastPrice": "99"}


def test_book_ticker_and_trade_frames_mark_their_cached_values() -> None:
    state = market_state()
    book = {"topic": BOOK, "type": "snapshot", "ts": 5, "data": {"b": [["1", "2"]], "a": [["3", "4"]], "u": 1}}
    ticker = {"topic": "tickers.BTCUSDT", "type": "snapshot", "ts": 6, "data": {"lastPrice": "2"}}
    trade = {"topic": "publicTrade.BTCUSDT", "ts": 7, "data": [{"p": "1"}, {"p": "2"}]}
    for frame in (book, ticker, trade):
        assert state.keep(feed(state, frame)) is False
    marks = state.cache.dirty  # type: ignore[union-attr]
    assert marks[book_key("p:", "linear", "BTCUSDT", 50)]()["b"] == [("1", "2")]
    assert marks[ticker_key("p:", "linear", "BTCUSDT")]() == {"data": {"lastPrice": "2"}, "exchange_ts": 6}
    assert marks[trade_key("p:", "linear", "BTCUSDT")]()["data"] == {"p": "2"}


def test_a_book_gap_asks_for_a_fresh_snapshot_and_counts_a_repair() -> None:
    state = market_state()
    state.keep(feed(state, {"topic": BOOK, "type": "snapshot", "data": {"b": [], "a": [], "u": 10}}))
    gap = feed(state, {"topic": BOOK, "type": "delta", "data": {"b": [], "a": [], "u": 12}})
    assert state.keep(gap) is True
    assert state.snapshot() == {"kept": 1, "gaps": 1, "repairs": 1}


def test_wallet_items_queue_one_balance_row_per_coin() -> None:
    state = market_state()
    coins = [{"coin": "USDT", "walletBalance": "10"}, {"coin": "BTC", "walletBalance": "0.5"}]
    wallet = {"topic": "wallet", "creationTime": 1700000000000, "data": [{"accountType": "UNIFIED", "coin": coins}]}
    state.keep(feed(state, wallet, "private"))
    pending = state.balances.pending  # type: ignore[union-attr]
    assert sorted(pending) == [("UNIFIED", "BTC"), ("UNIFIED", "USDT")]
    assert str(pending[("UNIFIED", "USDT")]["wallet_balance"]) == "10"


def test_leaving_a_topic_forgets_its_book_ticker_and_cached_values() -> None:
    state = market_state()
    state.keep(feed(state, {"topic": BOOK, "type": "snapshot", "data": {"b": [], "a": [], "u": 1}}))
    state.keep(feed(state, {"topic": "tickers.BTCUSDT", "type": "snapshot", "data": {"lastPrice": "2"}}))
    state.forget("linear", {BOOK, "tickers.BTCUSDT"})
    assert state.books == {} and state.tickers == {}
    cache = state.cache
    assert cache is not None and cache.dirty == {}
    assert cache.gone == {book_key("p:", "linear", "BTCUSDT", 50), ticker_key("p:", "linear", "BTCUSDT")}


def cache_writes_while_a_ticker_changes(pacing: Pacing, seconds: float) -> int:
    """How many times a ticker that changes every 5 ms is written to Redis in `seconds` of the cache's task."""

    async def run() -> int:
        client = aioredis.from_url("redis://127.0.0.1:6379")
        cache = LastValueCache(client, f"test-lvc-{os.getpid()}:", book_depth=5, interval=0.01)
        stop = asyncio.Event()
        task = asyncio.create_task(cache.run(stop, pacing))
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            cache.ticker("linear", "BTCUSDT", {"lastPrice": str(n)}, n)
            await asyncio.sleep(0.005)
        stop.set()
        await task
        await client.delete(*[key async for key in client.scan_iter(match=f"{cache.prefix}*")] or ["-"])
        await client.aclose()
        return cache.writes

    return asyncio.run(run())


def test_while_the_gateway_reads_late_the_cache_is_written_once_a_pacing_interval() -> None:
    on_time = Pacing(limit_ms=100, base_ms=100, max_ms=500)
    assert cache_writes_while_a_ticker_changes(on_time, 1.0) >= 20  # every 10 ms or so
    behind = Pacing(limit_ms=100, base_ms=100, max_ms=500)
    behind.behind, behind.interval_ms = True, 500
    assert cache_writes_while_a_ticker_changes(behind, 1.0) <= 4  # at 0, 0.5 and 1 s, and the last flush
