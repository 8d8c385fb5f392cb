"""Guessing the admin password: after AXES_FAILURE_LIMIT wrong ones, even the right one is refused."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from tests.test_settings import run_check

LOGIN = "/admin/login/?next=/admin/"


@pytest.fixture
def ops(db, settings) -> str:
    settings.AXES_FAILURE_LIMIT = 5
    # PBKDF2 takes a quarter second a try; these tests try a lot.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("ops", "ops@example.com", "right-password")
    return "ops"


def log_in(password: str, address: str = "10.0.0.1") -> tuple[int, Client]:
    client = Client(REMOTE_ADDR=address)
    response = client.post(LOGIN, {"username": "ops", "password": password})
    return response.status_code, client


def is_logged_in(client: Client) -> bool:
    return client.get("/admin/").status_code == 200


def test_the_right_password_after_five_wrong_ones_is_refused(ops: str) -> None:
    assert [log_in("wrong")[0] for _ in range(4)] == [200] * 4  # the form again, with its error
    assert log_in("wrong")[0] == 429  # the fifth locks
    code, client = log_in("right-password")
    assert code == 429 and not is_logged_in(client)


def test_the_lockout_is_per_address_and_lifted_by_axes_reset(ops: str) -> None:
    for _ in range(5):
        log_in("wrong")
    code, client = log_in("right-password", address="10.0.0.2")
    assert code == 302 and is_logged_in(client)
    call_command("axes_reset", stdout=StringIO())
    code, client = log_in("right-password")
    assert code == 302 and is_logged_in(client)


def test_a_success_before_the_limit_starts_the_count_again(ops: str) -> None:
    for _ in range(4):
        log_in("wrong")
    assert log_in("right-password")[0] == 302
    assert [log_in("wrong")[0] for _ in range(4)] == [200] * 4


def test_a_bad_lockout_setting_stops_startup() -> None:
    result = run_check(AXES_LOCKOUT_BY="cookie")
    assert "AXES_LOCKOUT_BY='cookie' is not one of ip_and_username, ip, username" in result.stderr
