"""Bad input is answered with a 400 or 413 and a JSON `code`, never a 500."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from rest_framework.test import APIClient
from structlog.testing import capture_logs

from subscriptions.services import subscription_create

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"


@pytest.fixture
def one_row(service_key: str) -> None:
    subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.content[:300]
    body = response.json()
    assert body["code"] == code
    if field is not None:
        assert field in body["fields"], body
    return body


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 2**63}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 2**63}, "offset"),
        ({"offset": "1.5"}, "offset"),
    ],
)
def test_limit_and_offset_out_of_range_are_400_not_replaced(
    api_client: APIClient, one_row: None, params: dict, field: str
) -> None:
    with capture_logs() as logs:
        response = api_client.get(URL, params)
    assert_error(response, 400, "invalid", field)
    assert not [e for e in logs if e["event"] == "api.unhandled_error"]


@pytest.mark.parametrize("url", ["/api/v1/balances", "/api/v1/queues"])
def test_every_list_checks_its_limit(api_client: APIClient, url: str) -> None:
    assert_error(api_client.get(url, {"limit": 2**64}), 400, "invalid", "limit")


def test_limits_in_range_still_page(api_client: APIClient, one_row: None) -> None:
    page = api_client.get(URL, {"limit": 1000, "offset": 0}).json()
    assert page["count"] == 1 and len(page["results"]) == 1
    assert api_client.get(URL, {"offset": 5}).json()["results"] == []


def test_superscript_digits_are_not_numbers(api_client: APIClient, redis_prefix: str) -> None:
    book = api_client.get("/api/v1/market/orderbook/linear/BTCUSDT", {"depth": "²"})
    assert_error(book, 400, "invalid", "depth")
    queue = api_client.get("/api/v1/queues/ws-gateway.alpha.trade", {"samples": "²"})
    assert_error(queue, 400, "invalid", "samples")


def test_nul_in_a_path_is_400(api_client: APIClient, operator_client: APIClient) -> None:
    assert_error(api_client.get("/api/v1/queues/ws-gateway.a%00b.trade"), 400, "invalid", "name")
    assert_error(operator_client.delete(f"{URL}/by-service/a%00b"), 400, "invalid", "service_name")
    assert_error(api_client.delete(f"{URL}/by-service/a%00b"), 400, "invalid", "service_name")


def test_a_queue_that_is_not_a_gateway_queue_is_400(api_client: APIClient) -> None:
    assert_error(api_client.get("/api/v1/queues/celery"), 400, "invalid", "name")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("[" * 100_000 + "]" * 100_000, "malformed_request"),
        ('{"a":' * 5_000 + "1" + "}" * 5_000, "malformed_request"),
        ('{"channel": ' + "[" * 900 + "]" * 900 + "}", "invalid"),
    ],
)
def test_deeply_nested_json_is_400(api_client: APIClient, body: str, code: str) -> None:
    assert_error(api_client.post(URL, body, content_type="application/json"), 400, code)


def test_a_body_over_the_upload_limit_is_413(api_client: APIClient, settings) -> None:
    body = '{"channel": "' + "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1) + '"}'
    assert_error(api_client.post(URL, body, content_type="application/json"), 413, "request_too_large")


def test_a_form_with_too_many_fields_is_refused_not_a_500(api_client: APIClient, settings) -> None:
    fields = urlencode({f"f{i}": "1" for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1)})
    response = api_client.post(URL, fields, content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")  # bodies are JSON: a form is refused unread
    assert_error(api_client.get(f"{URL}?{fields}"), 400, "malformed_request")


def test_unknown_field_names_are_truncated_in_errors(api_client: APIClient) -> None:
    response = api_client.post(URL, {"channel": "trades", "x" * 1_000_000: 1}, format="json")
    error = assert_error(response, 400, "invalid")
    assert list(error["fields"]) == ["x" * 40 + "…"]
    many = api_client.post(URL, {f"extra{i:04}": 1 for i in range(10_000)}, format="json")
    assert len(many.content) < 2_000
    assert "10000 unknown fields" in assert_error(many, 400, "invalid")["fields"]["non_field_errors"][0]


def test_unknown_api_paths_are_json_404(api_client: APIClient) -> None:
    for path in ("/api/v1/nope", "/api/v2/subscriptions", "/api/nothing/here"):
        assert_error(api_client.get(path), 404, "not_found")
    assert_error(APIClient().post("/api/v1/nope", {}), 404, "not_found")


def test_api_paths_missing_their_slash_still_redirect(api_client: APIClient) -> None:
    response = api_client.get("/api/schema")
    assert response.status_code == 301 and response["Location"] == "/api/schema/"
