"""Start-up refuses bad configuration with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_check(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "BYBIT_", "DATABASE_", "RABBITMQ_"))}
    base.update({"DJANGO_SECRET_KEY": "x" * 50, "PYTHONPATH": str(ROOT)}, **env)
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=base, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BYBIT_ENVIRONMENT", "moon", "BYBIT_ENVIRONMENT='moon' is not one of mainnet, testnet, demo, simulator"),
        ("WS_GATEWAY_PORT", "80a", "WS_GATEWAY_PORT='80a' is not an integer"),
        ("DATABASE_URL", "not a url", "DATABASE_URL must be a URL"),
        ("RABBITMQ_URL", "http://h/", "RABBITMQ_URL must be a URL"),
        ("BYBIT_REST_URL", "ws://h", "BYBIT_REST_URL must be a URL starting with http:// or https://"),
        ("REDIS_URL", "redis://h:port/0", "REDIS_URL is not a valid URL"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT='xml' is not one of json, console"),
        ("DJANGO_DEBUG", "maybe", "DJANGO_DEBUG='maybe' is not a boolean"),
        ("RABBITMQ_TLS_CA_FILE", "/nonexistent/ca.pem", "RABBITMQ_TLS_CA_FILE='/nonexistent/ca.pem' is not a file"),
        ("RABBITMQ_TLS_VERIFY", "perhaps", "RABBITMQ_TLS_VERIFY='perhaps' is not a boolean"),
    ],
)
def test_bad_value_stops_startup_naming_the_variable(name: str, value: str, expected: str) -> None:
    result = run_check(**{name: value})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"configuration error: {lines[0].removeprefix('configuration error: ')}"], result.stderr
    assert expected in lines[0]


def test_secret_in_a_bad_url_is_not_echoed() -> None:
    result = run_check(RABBITMQ_URL="http://guest:hunter2secret@host/")
    assert result.returncode != 0
    assert "hunter2secret" not in result.stderr + result.stdout


def test_missing_secret_key_outside_debug_is_refused() -> None:
    result = run_check(DJANGO_SECRET_KEY="")
    assert "DJANGO_SECRET_KEY is not set" in result.stderr


def test_half_set_bybit_credentials_are_refused() -> None:
    result = run_check(BYBIT_API_KEY="k")
    assert "BYBIT_API_KEY and BYBIT_API_SECRET must be set together" in result.stderr


def test_good_configuration_starts() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr
