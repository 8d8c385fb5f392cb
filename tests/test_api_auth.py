"""Who may call the API, and what each key may see and change."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from subscriptions.models import ApiKey
from subscriptions.services import api_key_revoke, subscription_create

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"


def test_missing_key_is_401_with_a_code() -> None:
    response = APIClient().get(URL)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


def test_wrong_key_is_401() -> None:
    client = APIClient()
    client.credentials(HTTP_X_API_KEY="wsg_thisisnotarealkeyatall0000000000")
    response = client.get(URL)
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_api_key"


def test_revoked_key_is_401(api_client: APIClient) -> None:
    api_key_revoke(api_key=ApiKey.objects.get(service_name="alpha"))
    assert api_client.get(URL).status_code == 401


def test_a_service_sees_only_its_own_rows(api_client: APIClient, other_key: str) -> None:
    mine, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    theirs, _ = subscription_create(service_name="bravo", channel="trades", category="linear", symbol="BTCUSDT")
    listed = api_client.get(URL).json()["results"]
    assert [row["id"] for row in listed] == [str(mine.id)]
    response = api_client.get(f"{URL}/{theirs.id}")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert api_client.delete(f"{URL}/{theirs.id}").status_code == 404
    theirs.refresh_from_db()
    assert theirs.status == "pending"


def test_naming_another_service_in_a_body_is_403(api_client: APIClient) -> None:
    body = {"service_name": "bravo", "channel": "trades", "category": "linear", "symbol": "BTCUSDT"}
    response = api_client.post(URL, body, format="json")
    assert response.status_code == 403 and response.json()["code"] == "other_service"
    assert api_client.delete(f"{URL}/by-service/bravo").status_code == 403


def test_operator_key_acts_for_any_service(operator_client: APIClient) -> None:
    body = {"service_name": "charlie", "channel": "ticker", "category": "spot", "symbol": "ETHUSDT"}
    created = operator_client.post(URL, body, format="json")
    assert created.status_code == 201 and created.json()["service_name"] == "charlie"
    assert operator_client.get(URL, {"service_name": "charlie"}).json()["count"] == 1
    missing = operator_client.post(URL, {"channel": "order"}, format="json")
    assert missing.status_code == 400 and "service_name" in missing.json()["fields"]


def test_error_bodies_never_echo_the_key(service_key: str) -> None:
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=service_key + "x")
    response = client.get(URL)
    assert service_key not in response.content.decode()
