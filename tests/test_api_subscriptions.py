"""Creating, listing and cancelling subscriptions through the API."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from subscriptions.models import Subscription

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"


def test_create_returns_the_derived_topic_routing_and_queue(api_client: APIClient) -> None:
    body = {"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT", "depth": 50}
    response = api_client.post(URL, body, format="json")
    assert response.status_code == 201
    row = response.json()
    assert row["bybit_topic"] == "orderbook.50.BTCUSDT"
    assert row["routing_key"] == "orderbook.linear.BTCUSDT.50"
    assert row["queue_name"] == "ws-gateway.alpha.orderbook"
    assert row["status"] == "pending" and row["service_name"] == "alpha"


def test_posting_the_same_live_subscription_returns_the_existing_row(api_client: APIClient) -> None:
    body = {"channel": "trades", "category": "spot", "symbol": "ETHUSDT"}
    first = api_client.post(URL, body, format="json")
    second = api_client.post(URL, body, format="json")
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert Subscription.objects.count() == 1


def test_a_cancelled_subscription_can_be_made_again(api_client: APIClient) -> None:
    body = {"channel": "trades", "category": "spot", "symbol": "ETHUSDT"}
    first = api_client.post(URL, body, format="json").json()
    api_client.delete(f"{URL}/{first['id']}")
    again = api_client.post(URL, body, format="json")
    assert again.status_code == 201 and again.json()["id"] != first["id"]


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"channel": "nope"}, "channel", "is not a valid choice"),
        ({"channel": "trades", "category": "linear", "symbol": "btcusdt"}, "symbol", "is not a Bybit linear symbol"),
        ({"channel": "trades", "category": "linear", "symbol": "BTC/USDT"}, "symbol", "is not a Bybit linear symbol"),
        ({"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT", "depth": 500}, "depth", "not offered"),
        (
            {"channel": "orderbook", "category": "option", "symbol": "BTC-26DEC26-100000-C", "depth": 50},
            "depth",
            "25, 100",
        ),
        ({"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT"}, "depth", "needs a depth"),
        ({"channel": "kline", "category": "linear", "symbol": "BTCUSDT", "interval": "2"}, "interval", "not offered"),
        ({"channel": "order", "category": "linear"}, "category", "takes no category"),
        ({"channel": "balance", "symbol": "BTCUSDT"}, "symbol", "takes no symbol"),
        ({"channel": "liquidation", "category": "spot", "symbol": "BTCUSDT"}, "category", "not offered on 'spot'"),
        ({"channel": "ticker", "category": "futures", "symbol": "BTCUSDT"}, "category", "not offered"),
        ({"channel": "trades", "category": "linear", "symbol": "BTCUSDT", "colour": "red"}, "colour", "Unknown field"),
        ({"channel": "trades", "category": "linear", "symbol": "B" * 41}, "symbol", "no more than 40"),
        ({"channel": "trades", "category": "linear", "symbol": "BTCUSDT", "depth": "x"}, "depth", "valid integer"),
    ],
)
def test_bad_input_is_400_naming_the_field_and_reason(
    api_client: APIClient, body: dict, field: str, reason: str
) -> None:
    response = api_client.post(URL, body, format="json")
    assert response.status_code == 400
    error = response.json()
    assert error["code"] == "invalid"
    assert reason in " ".join(error["fields"][field])
    assert Subscription.objects.count() == 0


def test_malformed_json_is_400_with_a_code(api_client: APIClient) -> None:
    response = api_client.post(URL, "{not json", content_type="application/json")
    assert response.status_code == 400 and response.json()["code"] == "malformed_request"


def test_cancel_keeps_the_row(api_client: APIClient) -> None:
    created = api_client.post(URL, {"channel": "order"}, format="json").json()
    response = api_client.delete(f"{URL}/{created['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["cancelled_at"]
    assert api_client.get(f"{URL}/{created['id']}").json()["status"] == "cancelled"


def test_cancel_by_service_returns_the_count(api_client: APIClient) -> None:
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
        api_client.post(URL, {"channel": "trades", "category": "linear", "symbol": symbol}, format="json")
    response = api_client.delete(f"{URL}/by-service/alpha")
    assert response.json() == {"service_name": "alpha", "cancelled": 3}
    assert api_client.delete(f"{URL}/by-service/alpha").json()["cancelled"] == 0


def test_list_is_paginated_and_filtered(api_client: APIClient) -> None:
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
        api_client.post(URL, {"channel": "trades", "category": "linear", "symbol": symbol}, format="json")
    api_client.post(URL, {"channel": "ticker", "category": "spot", "symbol": "ETHUSDT"}, format="json")
    page = api_client.get(URL, {"limit": 2}).json()
    assert page["count"] == 4 and len(page["results"]) == 2 and page["next"]
    assert api_client.get(URL, {"channel": "ticker"}).json()["count"] == 1
    assert api_client.get(URL, {"symbol": "ETHUSDT"}).json()["count"] == 2
    assert api_client.get(URL, {"category": "linear"}).json()["count"] == 3
    assert api_client.get(URL, {"status": "pending"}).json()["count"] == 4
    assert api_client.get(URL, {"status": "active"}).json()["count"] == 0
    assert api_client.get(URL, {"service_name": "alpha"}).json()["count"] == 4
    bad = api_client.get(URL, {"status": "sleeping"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid"


def test_unknown_id_is_404(api_client: APIClient) -> None:
    assert api_client.get(f"{URL}/not-a-uuid").status_code == 404
    assert api_client.get(f"{URL}/00000000-0000-0000-0000-000000000000").status_code == 404
