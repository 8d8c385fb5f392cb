"""Books, tickers and balances kept by the gateway, as consumers and the API see them."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from rest_framework.test import APIClient

from streaming.models import AccountBalance
from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import QueueReader, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
BOOK = "orderbook.50.BTCUSDT"


def live(subscription: Subscription) -> bool:
    subscription.refresh_from_db()
    return subscription.status == "active"


def subscribe_book() -> Subscription:
    book, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=50
    )
    wait_for(lambda: live(book), message="the book subscription live")
    return book


def test_book_events_say_they_are_consistent_and_the_api_serves_the_book(
    start_gateway, simulator, rabbit, api_client: APIClient
) -> None:
    start_gateway()
    subscribe_book()
    reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    reader.wait(lambda m: len(m) >= 5)
    assert all(m["consistent"] is True for m in reader.messages)
    response = wait_for(
        lambda: (r := api_client.get("/api/v1/market/orderbook/linear/BTCUSDT")).status_code == 200 and r
    )
    book = response.json()
    assert len(book["b"]) == len(book["a"]) == 50 and book["depth"] == 50 and book["consistent"]
    assert Decimal(book["b"][0][0]) < Decimal(book["a"][0][0])
    assert book["age_ms"] is not None and book["cache_age_ms"] >= 0
    trimmed = api_client.get("/api/v1/market/orderbook/linear/BTCUSDT", {"depth": 5}).json()
    assert len(trimmed["b"]) == len(trimmed["a"]) == 5
    reader.close()


def test_a_gap_is_flagged_to_consumers_and_repaired_by_a_fresh_snapshot(start_gateway, simulator, rabbit) -> None:
    runner = start_gateway()
    subscribe_book()
    reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    reader.wait(lambda m: len(m) >= 3)
    simulator.call(simulator.sim.gap("linear", BOOK))
    reader.wait(lambda m: any("gap" in e for e in m), message="an event flagged with the gap")
    flagged = next(i for i, e in enumerate(reader.messages) if "gap" in e)
    gap = reader.messages[flagged]
    assert gap["consistent"] is False and gap["gap"]["received_u"] == gap["gap"]["expected_u"] + 1
    reader.wait(lambda m: any(e["type"] == "snapshot" for e in m[flagged:]), message="the repairing snapshot")
    repair = next(e for e in reader.messages[flagged:] if e["type"] == "snapshot")
    assert repair["consistent"] is True
    assert simulator.subscribes[("linear", BOOK)] == 2  # resubscribed once for the snapshot
    books = runner.gateway.status()["books"]
    assert (books["gaps"], books["repairs"]) == (1, 1)
    reader.close()


def test_books_resynced_at_once_are_unsubscribed_ten_a_request_and_all_come_back(start_gateway, simulator) -> None:
    # A gateway far behind resyncs its books all at once (Gateway.shed): one request per book
    # would be hundreds of requests to Bybit within a second.
    runner = start_gateway()
    books = [
        subscription_create(service_name="alpha", channel="orderbook", category="linear", symbol=symbol, depth=depth)[0]
        for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT")
        for depth in (1, 50, 200, 1000)
    ]
    topics = sorted(book.bybit_topic for book in books)
    wait_for(lambda: all(simulator.sim.subscribes[("linear", t)] == 1 for t in topics), message="12 books live")
    sockets = [sock for sock in runner.gateway.sockets.values() if sock.category == "linear"]
    expected: list[int] = []
    sent_before = len(simulator.sim.requests)

    def resync_every_book() -> None:  # in one loop turn, as Gateway.shed does for books far behind
        for sock in sockets:
            expected.append(-(-len(sock.live) // 10))
            for topic in sorted(sock.live):
                sock.resubscribe(topic)

    runner.gateway.loop.call_soon_threadsafe(resync_every_book)
    wait_for(lambda: all(simulator.sim.subscribes[("linear", t)] == 2 for t in topics), message="every book again")
    sent = [orjson.loads(r["raw"]) for r in simulator.sim.requests[sent_before:]]
    unsubscribes = [r["args"] for r in sent if r.get("op") == "unsubscribe"]
    assert len(unsubscribes) == sum(expected) < len(topics)
    assert sorted(topic for args in unsubscribes for topic in args) == topics
    assert all(len(args) <= 10 for args in unsubscribes)


def test_a_u_1_restart_replaces_the_book_without_a_gap(start_gateway, simulator, rabbit) -> None:
    runner = start_gateway()
    subscribe_book()
    reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    reader.wait(lambda m: len(m) >= 3)
    simulator.call(simulator.sim.restart_book("linear", BOOK))
    reader.wait(lambda m: any(e["u"] == 1 for e in m), message="the restarted book")
    restart = next(e for e in reader.messages if e["u"] == 1)
    assert restart["consistent"] is True and "gap" not in restart
    seen = len(reader.messages)
    reader.wait(lambda m: len(m) >= seen + 3)
    assert all(e["consistent"] for e in reader.messages) and runner.gateway.status()["books"]["gaps"] == 0
    reader.close()


def test_ticker_events_carry_the_merged_ticker_beside_bybits_delta(
    start_gateway, simulator, rabbit, api_client
) -> None:
    start_gateway()
    ticker, _ = subscription_create(service_name="alpha", channel="ticker", category="linear", symbol="ETHUSDT")
    wait_for(lambda: live(ticker))
    reader = QueueReader(rabbit, "ws-gateway.alpha.ticker")
    reader.wait(lambda m: any(e["type"] == "delta" for e in m), message="a ticker delta")
    delta = next(e for e in reader.messages if e["type"] == "delta")
    assert "fundingRate" not in delta["data"] and "fundingRate" in delta["merged"]
    assert delta["merged"]["lastPrice"] == delta["data"]["lastPrice"]
    response = wait_for(lambda: (r := api_client.get("/api/v1/market/ticker/linear/ETHUSDT")).status_code == 200 and r)
    assert {"lastPrice", "fundingRate", "markPrice"} <= set(response.json()["data"])
    reader.close()


def test_market_endpoints_answer_404_for_topics_nobody_subscribed(redis_prefix, api_client: APIClient) -> None:
    for url in ("/api/v1/market/orderbook/linear/XRPUSDT", "/api/v1/market/ticker/spot/XRPUSDT"):
        response = api_client.get(url)
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert api_client.get("/api/v1/market/ticker/futures/BTCUSDT").status_code == 400
    assert api_client.get("/api/v1/market/orderbook/linear/BTCUSDT", {"depth": "x"}).status_code == 400
    assert APIClient().get("/api/v1/market/ticker/linear/BTCUSDT").status_code == 401


def test_wallet_events_update_balances_exactly(start_gateway, simulator, rabbit, api_client: APIClient) -> None:
    start_gateway()
    balance, _ = subscription_create(service_name="alpha", channel="balance")
    wait_for(lambda: live(balance))
    coin = {"coin": "USDT", "walletBalance": "12345.678901234567", "equity": "12000.5", "availableToWithdraw": "",
            "collateralSwitch": True}  # fmt: skip
    simulator.call(simulator.sim.emit_wallet(coin=[coin], accountType="UNIFIED", totalEquity="99.01"))
    row = wait_for(lambda: AccountBalance.objects.filter(account_type="UNIFIED", coin="USDT").first())
    assert row.wallet_balance == Decimal("12345.678901234567")
    assert (row.equity, row.available_to_withdraw, row.total_equity) == (Decimal("12000.5"), None, Decimal("99.01"))
    assert row.collateral_switch is True
    listed = api_client.get("/api/v1/balances", {"coin": "USDT"}).json()["results"]
    assert listed[0]["wallet_balance"] == "12345.678901234567000000"
    reader = QueueReader(rabbit, "ws-gateway.alpha.balance")
    reader.wait(lambda m: len(m) == 1 and m[0]["symbol"] == "UNIFIED")
    reader.close()


def test_cancelling_the_last_subscription_removes_the_cached_book(start_gateway, simulator, api_client) -> None:
    from subscriptions.services import subscription_cancel

    start_gateway()
    book = subscribe_book()
    url = "/api/v1/market/orderbook/linear/BTCUSDT"
    wait_for(lambda: api_client.get(url).status_code == 200, message="the cached book")
    subscription_cancel(subscription=book)
    wait_for(lambda: api_client.get(url).status_code == 404, message="the cached book removed")
