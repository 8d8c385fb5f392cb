"""The API documents itself: a valid OpenAPI 3 schema, docs and the browsable API."""

from __future__ import annotations

import json

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.test import Client
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_schema_is_valid_openapi_3_and_documents_the_key_header() -> None:
    response = Client().get("/api/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    validate(schema)
    assert schema["openapi"].startswith("3.")
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert "/api/v1/subscriptions/by-service/{service_name}" in schema["paths"]


def test_docs_page_and_browsable_api_render() -> None:
    assert Client().get("/api/docs/").status_code == 200
    staff = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(staff)
    page = client.get("/api/v1/subscriptions", HTTP_ACCEPT="text/html")
    assert page.status_code == 200 and b"Subscription" in page.content


def schema_as(client: Client | APIClient) -> dict:
    response = client.get("/api/schema/")
    assert response.status_code == 200
    return yaml.safe_load(response.content)


def test_schema_is_the_same_whoever_asks(service_key: str, settings) -> None:
    settings.WS_GATEWAY_API_KEY = "wsg_operator_schema_test_0123456789abcdef"
    anonymous = Client().get("/api/schema/").content
    for key in (service_key, settings.WS_GATEWAY_API_KEY):
        client = APIClient()
        client.credentials(HTTP_X_API_KEY=key)
        assert client.get("/api/schema/").content == anonymous
    listed = {p["name"] for p in yaml.safe_load(anonymous)["paths"]["/api/v1/subscriptions"]["get"]["parameters"]}
    assert {"service_name", "channel", "status", "symbol", "category", "limit", "offset"} <= listed


def test_deletes_are_documented_as_what_they_answer() -> None:
    paths = schema_as(Client())["paths"]
    cancel = paths["/api/v1/subscriptions/{id}"]["delete"]["responses"]
    by_service = paths["/api/v1/subscriptions/by-service/{service_name}"]["delete"]["responses"]
    assert "204" not in cancel and "204" not in by_service
    assert cancel["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Subscription"}
    assert by_service["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CancelledCount"}


def test_every_operation_documents_its_errors_in_the_error_shape() -> None:
    schema = schema_as(Client())
    error = {"$ref": "#/components/schemas/Error"}
    assert set(schema["components"]["schemas"]["Error"]["properties"]) == {"code", "detail", "fields"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert responses["401"]["content"]["application/json"]["schema"] == error, (method, path)
            checked = [p for p in operation.get("parameters", []) if p["name"] != "id"]  # a bad id is a 404
            assert "400" in responses or not checked, (method, path)
    assert {"413", "415"} <= set(schema["paths"]["/api/v1/subscriptions"]["post"]["responses"])


def test_read_endpoints_document_their_bodies() -> None:
    schemas = schema_as(Client())["components"]["schemas"]
    assert {"b", "a", "u", "age_ms", "cache_age_ms"} <= set(schemas["OrderBook"]["properties"])
    assert {"data", "exchange_ts", "age_ms"} <= set(schemas["Ticker"]["properties"])
    assert schemas["QueueDetail"]["properties"]["samples"]["type"] == "array"
    subscription = schemas["Subscription"]["properties"]
    assert "trades" in subscription["channel"]["enum"] and "cancelled" in subscription["status"]["enum"]


BODIES = [
    {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"},
    {"channel": "trades", "category": "option", "symbol": "BTC"},
    {"channel": "trades", "category": "option", "symbol": "BTC-27DEC24-50000-C"},
    {"channel": "ticker", "category": "option", "symbol": "BTC-27DEC24-50000-C"},
    {"channel": "orderbook", "category": "spot", "symbol": "ETHUSDT", "depth": 200},
    {"channel": "orderbook", "category": "spot", "symbol": "ETHUSDT", "depth": 25},
    {"channel": "orderbook", "category": "option", "symbol": "BTC-27DEC24-50000-C", "depth": 25},
    {"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT", "depth": "50"},
    {"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT"},
    {"channel": "kline", "category": "inverse", "symbol": "BTCUSD", "interval": "D"},
    {"channel": "kline", "category": "option", "symbol": "BTC-27DEC24-50000-C", "interval": "D"},
    {"channel": "kline", "category": "linear", "symbol": "BTCUSDT", "interval": "2"},
    {"channel": "liquidation", "category": "spot", "symbol": "BTCUSDT"},
    {"channel": "ticker", "category": "linear", "symbol": " BTCUSDT"},
    {"channel": "ticker", "category": "linear", "symbol": 12345},
    {"channel": "order"},
    {"channel": "order", "category": "", "symbol": "", "depth": None, "interval": ""},
    {"channel": "order", "category": "linear"},
    {"channel": "balance", "colour": "red"},
    {"channel": "wallet"},
    {"category": "linear", "symbol": "BTCUSDT"},
]


@pytest.mark.parametrize("body", BODIES, ids=lambda body: json.dumps(body)[:60])
def test_the_request_schema_accepts_exactly_what_the_api_accepts(api_client: APIClient, body: dict) -> None:
    schema = schema_as(Client())
    request = schema["components"]["schemas"]["SubscriptionRequest"]
    valid = OAS30Validator({**request, "components": schema["components"]}).is_valid(body)
    response = api_client.post("/api/v1/subscriptions", body, format="json")
    assert response.status_code in ((200, 201) if valid else (400,)), (valid, response.json())
