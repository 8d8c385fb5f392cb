"""Subscriptions become live upstream and every event reaches the right service queues."""

from __future__ import annotations

import pytest

from streaming.publisher import connect
from subscriptions.models import Subscription
from subscriptions.services import subscription_cancel, subscription_create
from tests.conftest import QueueReader, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def status_of(subscription: Subscription) -> str:
    subscription.refresh_from_db()
    return subscription.status


def trade_seqs(messages: list[dict]) -> list[int]:
    return [trade["seq"] for m in messages for trade in m["data"]]


def test_api_subscription_goes_live_and_events_arrive_in_order(start_gateway, simulator, rabbit, api_client) -> None:
    runner = start_gateway()
    response = api_client.post(
        "/api/v1/subscriptions", {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"}
    )
    assert response.status_code == 201
    subscription = Subscription.objects.get(pk=response.json()["id"])
    wait_for(lambda: status_of(subscription) == "active", timeout=3, message="the subscription to become active")
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 5, message="five trade events")
    first = reader.messages[0]
    assert first["class"] == "trade" and first["topic"] == "publicTrade.BTCUSDT"
    assert (first["category"], first["symbol"]) == ("linear", "BTCUSDT")
    assert reader.raw[0].delivery_info["routing_key"] == "trade.linear.BTCUSDT"
    assert reader.raw[0].properties["message_id"] == first["id"]
    seqs = trade_seqs(reader.messages)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous: nothing lost or reordered
    reader.close()
    assert runner.stop() == 0


def test_new_subscription_is_subscribed_upstream_within_a_second(start_gateway, simulator) -> None:
    start_gateway()
    subscription_create(service_name="alpha", channel="ticker", category="spot", symbol="ETHUSDT")
    wait_for(lambda: simulator.subscribes[("spot", "tickers.ETHUSDT")] == 1, timeout=1.0, message="upstream subscribe")


def test_two_services_share_one_upstream_subscription(start_gateway, simulator, rabbit) -> None:
    start_gateway()
    first, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="ETHUSDT", depth=50
    )
    second, _ = subscription_create(
        service_name="bravo", channel="orderbook", category="linear", symbol="ETHUSDT", depth=50
    )
    wait_for(lambda: status_of(first) == "active" and status_of(second) == "active", message="both active")
    alpha = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    bravo = QueueReader(rabbit, "ws-gateway.bravo.orderbook")
    alpha.wait(lambda m: len(m) >= 10)
    bravo.wait(lambda m: len(m) >= 10)
    common = {m["u"] for m in alpha.messages} & {m["u"] for m in bravo.messages}
    assert len(common) >= 5  # the same events, to both
    assert simulator.subscribes[("linear", "orderbook.50.ETHUSDT")] == 1

    subscription_cancel(subscription=first)
    seen = len(bravo.messages)
    bravo.wait(lambda m: len(m) >= seen + 10, message="bravo still flowing after alpha cancelled")
    assert simulator.subscribes[("linear", "orderbook.50.ETHUSDT")] == 1
    assert any("orderbook.50.ETHUSDT" in c["topics"] for c in simulator.stats()["connections"])

    subscription_cancel(subscription=second)
    wait_for(
        lambda: not any("orderbook.50.ETHUSDT" in c["topics"] for c in simulator.stats()["connections"]),
        message="the upstream unsubscribe once nobody wants the topic",
        timeout=30,
    )
    alpha.close()
    bravo.close()


def test_unknown_symbol_fails_with_bybits_message_and_disturbs_nothing(start_gateway, simulator, rabbit) -> None:
    start_gateway()
    good, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="ETHUSDT")
    bad, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="NOPEUSDT")
    wait_for(lambda: status_of(bad) == "failed", message="the unknown symbol to fail")
    assert bad.error == "error:handler not found,topic:publicTrade.NOPEUSDT"
    wait_for(lambda: status_of(good) == "active")
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 3)
    assert {m["symbol"] for m in reader.messages} == {"ETHUSDT"}
    reader.close()


def test_private_order_update_reaches_the_service(start_gateway, simulator, rabbit) -> None:
    start_gateway()
    subscription, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: status_of(subscription) == "active", message="the private subscription to become active")
    sent = simulator.call(simulator.sim.emit_order(symbol="SOLUSDT", category="spot", orderStatus="Filled"))
    reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    reader.wait(lambda m: len(m) >= 1, message="the order event")
    (event,) = reader.messages
    assert event["data"] == sent["data"][0]
    # Published to the service's queue by name (docs/gateway.md): the routing key is the queue's.
    assert reader.raw[0].delivery_info["routing_key"] == "ws-gateway.alpha.order"  # a copy per queue, by name
    assert reader.raw[0].properties["application_headers"]["routing_key"] == "order.spot.SOLUSDT"
    assert (event["class"], event["category"], event["symbol"]) == ("order", "spot", "SOLUSDT")
    assert reader.raw[0].properties["delivery_mode"] == 2
    reader.close()


def test_private_subscription_without_credentials_fails_clearly(start_gateway, gateway_settings) -> None:
    gateway_settings.BYBIT_API_KEY = gateway_settings.BYBIT_API_SECRET = ""
    start_gateway()
    subscription, _ = subscription_create(service_name="alpha", channel="execution")
    wait_for(lambda: status_of(subscription) == "failed")
    assert "BYBIT_API_KEY" in subscription.error


def test_a_queue_with_other_arguments_is_used_and_blocks_nobody(start_gateway, simulator, rabbit) -> None:
    """A retention setting changed after the queue was made: the old queue keeps delivering."""
    from streaming.publisher import connect

    conn = connect(rabbit)
    conn.channel().queue_declare("ws-gateway.alpha.trade", durable=True, auto_delete=False,
                                 arguments={"x-max-length": 7})  # fmt: skip
    conn.close()
    start_gateway()
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    book, _ = subscription_create(service_name="bravo", channel="orderbook", category="spot", symbol="BTCUSDT", depth=1)
    wait_for(lambda: status_of(trades) == "active" and status_of(book) == "active", message="both active")
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 2, message="trades in the pre-existing queue")
    reader.close()


def test_tail_events_prints_a_services_events_without_taking_them(start_gateway, simulator, rabbit) -> None:
    from io import StringIO

    from django.core.management import call_command

    start_gateway()
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="SOLUSDT")
    wait_for(lambda: status_of(trades) == "active")
    out = StringIO()
    call_command("tail_events", service="alpha", count=3, timeout=5, stdout=out, stderr=StringIO())
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(" trade.linear.SOLUSDT snapshot " in line for line in lines)
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")  # the service's own queue still has its events
    reader.wait(lambda m: len(m) >= 3)
    reader.close()


def last_event(subscription: Subscription):
    subscription.refresh_from_db()
    return subscription.last_event_at


def test_each_live_subscription_records_when_its_topic_last_had_an_event(start_gateway, simulator, monkeypatch) -> None:
    from streaming import reconciler

    monkeypatch.setattr(reconciler, "LAST_EVENT_FLUSH_INTERVAL", 0.2)
    start_gateway()
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    ticker, _ = subscription_create(service_name="bravo", channel="ticker", category="spot", symbol="ETHUSDT")
    wait_for(lambda: status_of(trades) == "active" and status_of(ticker) == "active", message="both active")
    wait_for(lambda: last_event(trades) and last_event(ticker), message="both topics' last event times written")
    first = (last_event(trades), last_event(ticker))
    wait_for(lambda: last_event(trades) > first[0] and last_event(ticker) > first[1], message="both moving on")

    subscription_cancel(subscription=ticker)
    cancelled_at, before = last_event(ticker), last_event(trades)
    wait_for(lambda: last_event(trades) > before, message="the live one moving on")
    assert last_event(ticker) == cancelled_at  # a cancelled row is left alone


def test_a_gateway_reading_late_sends_each_book_once_an_interval_and_trades_in_full(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    gateway_settings.GATEWAY_LAG_LIMIT_MS = -1  # every frame counts as read late
    gateway_settings.GATEWAY_CONFLATE_INTERVAL_MS = gateway_settings.GATEWAY_CONFLATE_MAX_INTERVAL_MS = 250
    runner = start_gateway()
    book, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=50
    )
    trade, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    # A row turns active once a reconcile round has declared, bound and routed its queue.
    wait_for(lambda: status_of(book) == "active" and status_of(trade) == "active", message="both active")
    books = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    trades = QueueReader(rabbit, "ws-gateway.alpha.trade")
    books.wait(lambda m: sum(1 for b in m if b.get("conflated")) >= 8, message="eight paced snapshots")
    sent = simulator.stats()["sent"]["linear:orderbook.50.BTCUSDT"]
    assert len(books.messages) * 3 < sent  # a snapshot every 250 ms, not every 20 ms frame
    first = next(n for n, book in enumerate(books.messages) if book["type"] == "snapshot")
    u = books.messages[first]["u"]
    for book in books.messages[first + 1 :]:  # what a consumer rebuilds stays whole: a delta goes on from u
        assert book["type"] == "snapshot" or book["u"] == u + 1, (book["type"], book["u"], u)
        u = book["u"]
    pacing = runner.gateway.handoff.pacing
    assert pacing.interval_ms == 250 and pacing.behind
    trades.wait(lambda m: len(m) >= 10, message="trades")
    seqs = trade_seqs(trades.messages)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # never paced: every trade, in order
    books.close()
    trades.close()


def test_a_consumer_behind_paces_books_though_the_gateway_reads_on_time(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    gateway_settings.GATEWAY_CONSUMER_BACKLOG = 20
    runner = start_gateway()
    book, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=50
    )
    wait_for(lambda: status_of(book) == "active", message="active")
    pacing = runner.gateway.handoff.pacing
    stuck = connect(rabbit, name="test stuck consumer")
    channel = stuck.channel()
    channel.basic_qos(0, 1, False)
    channel.basic_consume("ws-gateway.alpha.orderbook", callback=lambda message: None)  # takes one, never acks
    wait_for(lambda: pacing.downstream and pacing.behind, timeout=10, message="pacing for the consumer behind")
    stuck.close()
    books = QueueReader(rabbit, "ws-gateway.alpha.orderbook")  # a consumer that keeps up
    wait_for(lambda: not pacing.downstream, timeout=10, message="the consumer caught up")
    books.wait(lambda m: any(b.get("conflated") for b in m), message="a paced snapshot")
    assert pacing.behind  # paced at the base interval for a while yet: the full rate would build it again
    books.close()
    assert runner.stop() == 0


def test_a_gateway_far_behind_resyncs_a_book_from_a_snapshot_and_its_consumer_stays_whole(
    start_gateway, simulator, rabbit
) -> None:
    runner = start_gateway()
    book, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=50
    )
    wait_for(lambda: status_of(book) == "active", message="active")
    books = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    books.wait(lambda m: len(m) >= 5, message="book events")
    topic = ("linear", "orderbook.50.BTCUSDT")
    simulator.call(simulator.sim.control.late(2_000, 2.0))  # frames read as if two seconds behind
    counters = runner.gateway.counters
    wait_for(lambda: counters.resyncs == 1, timeout=10, message="a resync")
    wait_for(lambda: simulator.stats()["subscribes"]["linear:orderbook.50.BTCUSDT"] == 2, message="subscribed again")
    local = runner.gateway.market.books[topic]
    wait_for(lambda: local.consistent and not local.shedding, timeout=10, message="the book whole again")
    count = len(books.messages)
    books.wait(lambda m: len(m) > count + 5, message="book events after the resync")
    first = next(n for n, b in enumerate(books.messages) if b["type"] == "snapshot")
    u = books.messages[first]["u"]
    for event in books.messages[first + 1 :]:  # what a consumer rebuilds stays whole throughout
        assert event["type"] == "snapshot" or event["u"] == u + 1, (event["type"], event["u"], u)
        u = event["u"]
    books.close()
    assert runner.stop() == 0
