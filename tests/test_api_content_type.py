"""Request bodies are JSON; a body sent any other way is refused with a 415 that says how to send it."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from subscriptions.models import Subscription

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"
BODY = '{"channel": "trades", "category": "linear", "symbol": "BTCUSDT"}'


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", ""])
def test_a_json_body_without_the_json_content_type_is_a_415(api_client: APIClient, content_type: str) -> None:
    # What `curl -d '{...}'` sends when -H 'Content-Type: application/json' is forgotten.
    response = api_client.generic("POST", URL, BODY, content_type=content_type)
    assert response.status_code == 415
    body = response.json()
    assert body["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in body["detail"]
    assert not Subscription.objects.exists()


def test_the_same_body_as_json_is_accepted(api_client: APIClient) -> None:
    response = api_client.generic("POST", URL, BODY, content_type="application/json")
    assert response.status_code == 201


def test_the_schema_offers_json_bodies_only(api_client: APIClient) -> None:
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert list(schema["paths"][URL]["post"]["requestBody"]["content"]) == ["application/json"]
