"""Every request gets a trace id in its logs and its response; secrets never reach a log line."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest
import structlog
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from wsgateway.logging import LogThrottle, redact_secrets

pytestmark = pytest.mark.django_db


@pytest.fixture
def rendered_logs() -> Iterator[io.StringIO]:
    """Everything logged during the test, rendered by the project's own formatter."""
    root = logging.getLogger()
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)


def test_sent_request_id_is_echoed_and_bound_to_log_lines(rendered_logs: io.StringIO) -> None:
    response = Client().get("/health", HTTP_X_REQUEST_ID="trace-abc-123")
    assert response["X-Request-ID"] == "trace-abc-123"
    assert re.search(r"http\.request.*trace_id=trace-abc-123", rendered_logs.getvalue())


def test_a_trace_id_is_made_when_none_is_sent() -> None:
    first = Client().get("/health")["X-Request-ID"]
    second = Client().get("/health")["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_an_unsafe_request_id_is_replaced() -> None:
    response = Client().get("/health", HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


def test_keys_secrets_and_url_passwords_never_reach_the_output(
    rendered_logs: io.StringIO, capsys, service_key: str, settings
) -> None:
    settings.BYBIT_API_SECRET = "bybit-secret-value-42"
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=service_key)
    client.post("/api/v1/subscriptions", {"channel": "order"}, format="json")
    client.credentials(HTTP_X_API_KEY=service_key + "wrong")
    client.get("/api/v1/subscriptions")
    log = structlog.get_logger("test")
    log.warning("test.secrets", api_key=service_key, secret=settings.BYBIT_API_SECRET,
                signature="deadbeef" * 8, url="amqp://guest:hunter2@127.0.0.1:5672//")  # fmt: skip
    call_command("create_api_key", "gamma")
    raw_key = capsys.readouterr().out.strip().splitlines()[-1]
    assert raw_key.startswith("wsg_")
    output = rendered_logs.getvalue()
    for secret in (service_key, "bybit-secret-value-42", "deadbeef" * 8, "hunter2", raw_key):
        assert secret not in output, f"a secret reached the log: {secret[:8]}..."
    assert "test.secrets" in output and "[redacted]" in output and "api_key.issued" in output


def test_redaction_reaches_nested_values() -> None:
    event = redact_secrets(None, "info", {"event": "x", "request": {"headers": {"X-API-Key": "k1"}, "args": ["a"]}})
    assert event["request"]["headers"]["X-API-Key"] == "[redacted]"


def test_throttle_allows_one_line_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = LogThrottle(interval=10, clock=lambda: now[0])
    assert throttle.allow("k") == 0
    assert throttle.allow("k") is None and throttle.allow("k") is None
    now[0] = 10.5
    assert throttle.allow("k") == 2


def test_throttle_hands_over_what_no_later_line_reported() -> None:
    now = [0.0]
    throttle = LogThrottle(interval=10, clock=lambda: now[0])
    throttle.allow("a")
    throttle.allow("a")
    throttle.allow("b")
    assert throttle.overdue() == {}  # still inside the window: the next line may report it
    now[0] = 10.5
    assert throttle.overdue() == {"a": 1}
    assert throttle.overdue() == {} and throttle.allow("a") == 0  # reported once, not twice
