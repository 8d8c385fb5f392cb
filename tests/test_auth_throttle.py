"""Guessing keys: failed API-key attempts are throttled per client address (429 with Retry-After)."""

from __future__ import annotations

import socket

import pytest
from rest_framework.test import APIClient

from tests.conftest import wait_for

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"
WRONG = "wsg_thisisnotarealkeyatall0000000000"


@pytest.fixture
def throttle(settings, redis_prefix: str):
    """The throttle on, as in production (the suite turns it off), with this test's Redis prefix."""
    settings.AUTH_FAILURE_LIMIT = 20
    settings.AUTH_FAILURE_WINDOW = 300
    return settings


def get(key: str, address: str = "10.0.0.1", **headers: str):
    client = APIClient(REMOTE_ADDR=address)
    client.credentials(HTTP_X_API_KEY=key)
    return client.get(URL, **headers)


def test_wrong_keys_past_the_limit_get_429_with_retry_after(throttle) -> None:
    codes = [get(WRONG).status_code for _ in range(60)]
    assert codes == [401] * 20 + [429] * 40
    response = get(WRONG)
    assert response.json()["code"] == "throttled"
    assert 0 < int(response["Retry-After"]) <= 300


def test_a_throttled_address_cannot_confirm_a_right_key_but_others_can(throttle, service_key: str) -> None:
    for _ in range(20):
        get(WRONG)
    assert get(service_key).status_code == 429  # a lucky guess would look like every other attempt
    assert get(service_key, address="10.0.0.2").status_code == 200


def test_only_failures_count(throttle, service_key: str) -> None:
    for _ in range(50):
        assert get(service_key).status_code == 200
    assert get(WRONG).status_code == 401
    assert APIClient(REMOTE_ADDR="10.0.0.1").get(URL).status_code == 401  # no key at all is no guess


def test_the_address_may_try_again_when_the_window_ends(throttle) -> None:
    throttle.AUTH_FAILURE_WINDOW = 1
    for _ in range(20):
        get(WRONG)
    assert get(WRONG).status_code == 429
    wait_for(lambda: get(WRONG).status_code == 401, timeout=5, interval=0.2, message="the window to end")


def test_behind_a_proxy_the_forwarded_address_is_counted(throttle) -> None:
    throttle.TRUSTED_PROXY_COUNT = 1
    for _ in range(20):
        get(WRONG, address="10.9.9.9", HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert get(WRONG, address="10.9.9.9", HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 429
    # Another client behind the same proxy is not punished; a spoofed extra entry changes nothing.
    assert get(WRONG, address="10.9.9.9", HTTP_X_FORWARDED_FOR="203.0.113.8").status_code == 401
    spoofed = get(WRONG, address="10.9.9.9", HTTP_X_FORWARDED_FOR="1.1.1.1, 203.0.113.7")
    assert spoofed.status_code == 429


def test_redis_down_fails_open(throttle, service_key: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    throttle.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    assert get(WRONG).status_code == 401
    assert get(service_key).status_code == 200
