"""A channel may be named by its event class ("trade"), and a wrong name is answered with the valid ones."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from subscriptions.topics import CHANNELS

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"


def test_the_class_name_subscribes_to_its_channel(api_client: APIClient) -> None:
    response = api_client.post(URL, {"channel": "trade", "category": "linear", "symbol": "BTCUSDT"})
    assert response.status_code == 201
    row = response.json()
    assert (row["channel"], row["event_class"], row["queue_name"]) == ("trades", "trade", "ws-gateway.alpha.trade")
    again = api_client.post(URL, {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"})
    assert (again.status_code, again.json()["id"]) == (200, row["id"])


def test_an_unknown_channel_lists_the_valid_ones(api_client: APIClient) -> None:
    response = api_client.post(URL, {"channel": "trds", "category": "linear", "symbol": "BTCUSDT"})
    assert response.status_code == 400
    message = response.json()["fields"]["channel"][0]
    assert "trds" in message
    assert all(name in message for name in CHANNELS), message
