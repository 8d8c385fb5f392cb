"""The topic catalogue: what Bybit serves, and the names derived from it."""

from __future__ import annotations

import pytest

from subscriptions.topics import TopicError, parse_bybit_topic, queue_name, resolve


@pytest.mark.parametrize(
    ("args", "bybit", "routing_key"),
    [
        (("trades", "spot", "BTCUSDT"), "publicTrade.BTCUSDT", "trade.spot.BTCUSDT"),
        (("trades", "option", "BTC"), "publicTrade.BTC", "trade.option.BTC"),
        (
            ("ticker", "option", "BTC-26DEC26-100000-C"),
            "tickers.BTC-26DEC26-100000-C",
            "ticker.option.BTC-26DEC26-100000-C",
        ),
        (("orderbook", "inverse", "BTCUSD", 1000), "orderbook.1000.BTCUSD", "orderbook.inverse.BTCUSD.1000"),
        (("kline", "linear", "ETHUSDT", None, "240"), "kline.240.ETHUSDT", "kline.linear.ETHUSDT.240"),
        (("liquidation", "inverse", "BTCUSD"), "allLiquidation.BTCUSD", "liquidation.inverse.BTCUSD"),
        (("balance",), "wallet", "balance.#"),
        (("position",), "position", "position.#"),
    ],
)
def test_resolve_derives_bybit_topic_and_routing_key(args: tuple, bybit: str, routing_key: str) -> None:
    topic = resolve(*args)
    assert (topic.bybit_topic, topic.routing_key) == (bybit, routing_key)
    assert parse_bybit_topic(bybit) is not None


def test_queue_names_are_per_service_and_class() -> None:
    assert resolve("orderbook", "linear", "BTCUSDT", 50).queue_name("risk") == "ws-gateway.risk.orderbook"
    assert queue_name("risk", "balance") == "ws-gateway.risk.balance"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("orderbook", "option", "BTC-26DEC26-100000-C", 50), "depth"),
        (("orderbook", "spot", "BTCUSDT", 25), "depth"),
        (("trades", "option", "BTCUSDT"), "symbol"),
        (("ticker", "option", "BTCUSDT"), "symbol"),
        (("kline", "option", "BTC-26DEC26-100000-C", None, "1"), "category"),
        (("trades", "linear", "BTCUSDT", 50), "depth"),
        (("ticker", "linear", "BTCUSDT", None, "1"), "interval"),
        (("execution", "", "", None, "1"), "interval"),
        (("trades", "", "BTCUSDT"), "category"),
        (("trades", "linear", ""), "symbol"),
    ],
)
def test_requests_bybit_would_refuse_name_the_field(args: tuple, field: str) -> None:
    with pytest.raises(TopicError) as refused:
        resolve(*args)
    assert refused.value.field == field


def test_unknown_bybit_topics_do_not_parse() -> None:
    assert parse_bybit_topic("nosuch.BTCUSDT") is None
    assert parse_bybit_topic("orderbook.x.BTCUSDT") is None
    assert parse_bybit_topic("orderbook.50") is None


def test_the_event_class_names_its_channel() -> None:
    topic = resolve("trade", "linear", "BTCUSDT")
    assert (topic.channel, topic.bybit_topic, topic.routing_key) == (
        "trades",
        "publicTrade.BTCUSDT",
        "trade.linear.BTCUSDT",
    )


def test_an_unknown_channel_is_refused_with_every_channel_named() -> None:
    with pytest.raises(TopicError) as refused:
        resolve("tickers", "linear", "BTCUSDT")
    assert refused.value.field == "channel"
    assert "trades, ticker, orderbook, kline, liquidation, order, execution, position, balance" in refused.value.message
