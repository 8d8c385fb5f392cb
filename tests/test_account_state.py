"""A service that subscribes late gets the account's current state; the API serves open orders and positions."""

from __future__ import annotations

import pytest
import redis
from rest_framework.test import APIClient

from subscriptions.models import Subscription
from subscriptions.services import subscription_cancel, subscription_create
from tests.conftest import QueueReader, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def subscribe(service: str, channel: str) -> Subscription:
    subscription, _ = subscription_create(service_name=service, channel=channel)
    wait_for(
        lambda: (subscription.refresh_from_db() or subscription.status) == "active",
        timeout=10,
        message=f"{service}'s {channel} subscription live",
    )
    return subscription


def order_ids(messages: list[dict], source: str | None = None) -> set[str]:
    return {
        m["data"]["orderId"]
        for m in messages
        if m.get("type") != "resync" and (source is None or m.get("source") == source)
    }


def test_a_late_joiner_gets_the_open_orders_placed_before_it_subscribed(
    start_gateway, simulator, rabbit, settings, api_client: APIClient
) -> None:
    settings.BYBIT_REST_URL = simulator.rest_url
    start_gateway()
    subscribe("early", "order")
    early = QueueReader(rabbit, "ws-gateway.early.order")
    early.wait(lambda m: any(x.get("reason") == "snapshot" for x in m), message="early's own (empty) snapshot")
    for n in range(3):
        simulator.call(simulator.sim.emit_order(orderId=f"open-{n}"))
    simulator.call(simulator.sim.emit_order(orderId="done", orderStatus="Filled"))
    early.wait(lambda m: order_ids(m) >= {"open-0", "open-1", "open-2", "done"}, message="the orders streamed")

    subscribe("late", "order")
    late = QueueReader(rabbit, "ws-gateway.late.order")
    late.wait(lambda m: order_ids(m, "rest") == {"open-0", "open-1", "open-2"}, message="the late joiner's snapshot")
    snapshot = [m for m in late.messages if m.get("source") == "rest" and m["type"] != "resync"]
    assert all(m["type"] == "snapshot" and m["class"] == "order" for m in snapshot)
    late.wait(lambda m: any(x.get("reason") == "snapshot" and x["counts"] == {"events": 3} for x in m))
    assert {m["id"] for m in snapshot} <= {m["id"] for m in early.messages}  # the stream's ids: dedupe works

    early.drain(0.5)
    assert order_ids(early.messages, "rest") == set()  # the snapshot went to the late joiner's queue alone

    response = api_client.get("/api/v1/account/orders", {"status": "open"})
    assert response.status_code == 200
    assert {o["orderId"] for o in response.json()["results"]} == {"open-0", "open-1", "open-2"}
    assert api_client.get("/api/v1/account/orders", {"status": "closed"}).status_code == 400
    early.close()
    late.close()


def test_open_positions_are_served_and_a_closed_one_leaves(
    start_gateway, simulator, rabbit, settings, api_client: APIClient
) -> None:
    settings.BYBIT_REST_URL = simulator.rest_url
    start_gateway()
    subscribe("alpha", "position")
    reader = QueueReader(rabbit, "ws-gateway.alpha.position")
    simulator.call(simulator.sim.emit_position(symbol="BTCUSDT", size="0.5"))
    simulator.call(simulator.sim.emit_position(symbol="ETHUSDT", size="2"))
    reader.wait(lambda m: {p["data"]["symbol"] for p in m if p.get("type") != "resync"} >= {"BTCUSDT", "ETHUSDT"})

    def served() -> set[str]:
        return {p["symbol"] for p in api_client.get("/api/v1/account/positions").json()["results"]}

    wait_for(lambda: served() == {"BTCUSDT", "ETHUSDT"}, message="both positions served")
    simulator.call(simulator.sim.emit_position(symbol="ETHUSDT", size="0"))
    wait_for(lambda: served() == {"BTCUSDT"}, message="the closed position gone")
    linear = api_client.get("/api/v1/account/positions", {"category": "linear", "symbol": "BTCUSDT"}).json()
    assert [p["size"] for p in linear["results"]] == ["0.5"]
    reader.close()


def test_a_position_closed_while_the_private_socket_was_away_is_repaired_from_rest(
    start_gateway, simulator, rabbit, settings, api_client: APIClient
) -> None:
    """Bybit lists open positions only: the back-fill asks for a closed one by its symbol."""
    settings.BYBIT_REST_URL = simulator.rest_url
    settings.GATEWAY_AUTH_RETRY_CAP = 0.3
    start_gateway()
    subscribe("alpha", "position")
    reader = QueueReader(rabbit, "ws-gateway.alpha.position")
    simulator.call(simulator.sim.emit_position(symbol="BTCUSDT", size="0.5"))
    simulator.call(simulator.sim.emit_position(symbol="ETHUSDT", size="2"))

    def served() -> set[str]:
        return {p["symbol"] for p in api_client.get("/api/v1/account/positions").json()["results"]}

    wait_for(lambda: served() == {"BTCUSDT", "ETHUSDT"}, message="both positions served")
    simulator.call(simulator.sim.reject_auth(True))
    simulator.call(simulator.sim.drop_connections())
    wait_for(lambda: not any(c["authed"] for c in simulator.stats()["connections"]), message="no private stream")
    closed = simulator.call(simulator.sim.emit_position(symbol="ETHUSDT", size="0"))  # nobody hears it
    simulator.call(simulator.sim.reject_auth(False))

    def repaired(messages: list[dict]) -> bool:
        return any(m.get("source") == "rest" and m.get("data") == closed["data"][0] for m in messages)

    reader.wait(repaired, message="the closed position's last state, from REST")
    at = closed["creationTime"]

    def resynced(messages: list[dict]) -> list[dict]:
        return [m for m in messages if m.get("type") == "resync" and m["from_ts"] <= at <= m["to_ts"]]

    reader.wait(lambda m: resynced(m), message="the resync event naming the repaired window")
    # Both positions' states: the open one Bybit lists, the closed one asked for by its symbol.
    assert all(r["class"] == "position" and r["counts"] == {"events": 2} for r in resynced(reader.messages))
    wait_for(lambda: served() == {"BTCUSDT"}, message="the closed position no longer served")
    reader.close()


def test_an_order_that_closes_while_nobody_streams_orders_is_never_served_as_open(
    start_gateway, simulator, rabbit, settings, api_client: APIClient
) -> None:
    """Unsubscribed, the gateway cannot see an order fill: it forgets the open orders and says so."""
    settings.BYBIT_REST_URL = simulator.rest_url
    start_gateway()
    subscription = subscribe("desk", "order")

    def served() -> tuple[int, set[str]]:
        response = api_client.get("/api/v1/account/orders")
        return response.status_code, {o["orderId"] for o in response.json().get("results", [])}

    simulator.call(simulator.sim.emit_order(orderId="left-open"))
    wait_for(lambda: served() == (200, {"left-open"}), message="the open order served")

    subscription_cancel(subscription=subscription)
    cache = redis.Redis.from_url(settings.REDIS_URL)
    wait_for(lambda: cache.hlen(f"{settings.REDIS_KEY_PREFIX}lvc:order") == 0, message="the order state cleared")
    response = api_client.get("/api/v1/account/orders")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert "order channel" in response.json()["detail"]

    simulator.call(simulator.sim.emit_order(orderId="left-open", orderStatus="Filled"))  # unseen by the gateway
    simulator.call(simulator.sim.emit_order(orderId="placed-meanwhile"))
    subscribe("desk", "order")
    wait_for(lambda: served() == (200, {"placed-meanwhile"}), message="the account's true open orders, from REST")
    cache.close()


def test_the_account_endpoints_need_the_account_scope(db) -> None:
    from subscriptions.services import api_key_issue

    client = APIClient()
    client.credentials(HTTP_X_API_KEY=api_key_issue(service_name="charts", scopes=["market"])[1])
    for path in ("/api/v1/account/orders", "/api/v1/account/positions"):
        response = client.get(path)
        assert response.status_code == 403 and response.json()["code"] == "missing_scope", path


def test_a_late_joiner_gets_the_open_positions_and_the_wallet(start_gateway, simulator, rabbit, settings) -> None:
    settings.BYBIT_REST_URL = simulator.rest_url
    start_gateway()
    simulator.call(simulator.sim.emit_position(symbol="BTCUSDT", size="0.5"))
    simulator.call(simulator.sim.emit_position(symbol="ETHUSDT", size="0"))  # closed: not current state
    simulator.call(simulator.sim.emit_wallet())  # all before anyone subscribed: never streamed to us

    subscribe("late", "position")
    subscribe("late", "balance")
    positions = QueueReader(rabbit, "ws-gateway.late.position")
    wallet = QueueReader(rabbit, "ws-gateway.late.balance")
    positions.wait(lambda m: any(x.get("reason") == "snapshot" for x in m), message="the position snapshot")
    wallet.wait(lambda m: any(x.get("reason") == "snapshot" for x in m), message="the wallet snapshot")
    # The new class's back-fill and the late joiner's snapshot both carry the current state: one id, one position.
    snapshot = {m["id"]: m for m in positions.messages if m.get("source") == "rest" and m["type"] != "resync"}
    assert [(m["type"], m["data"]["symbol"], m["data"]["size"]) for m in snapshot.values()] == [
        ("snapshot", "BTCUSDT", "0.5")
    ]
    accounts = {m["id"]: m for m in wallet.messages if m.get("source") == "rest" and m["type"] != "resync"}
    assert [m["data"]["accountType"] for m in accounts.values()] == ["UNIFIED"]
    assert "USDT" in {c["coin"] for m in accounts.values() for c in m["data"]["coin"]}
    positions.close()
    wallet.close()
