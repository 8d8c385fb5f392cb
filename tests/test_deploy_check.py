"""Production settings pass `manage.py check --deploy`: HTTPS redirect, HSTS and secure cookies by default."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

ROOT = Path(__file__).resolve().parent.parent


def check_deploy(**env: str) -> subprocess.CompletedProcess[str]:
    """`manage.py check --deploy` as production would run it: no DEBUG, a real secret, a real host name."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "BYBIT_", "DATABASE_", "RABBITMQ_"))}
    base.update(
        {
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "DJANGO_ALLOWED_HOSTS": "gw.example.com",
            "PYTHONPATH": str(ROOT),
        }
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_defaults_pass_the_deploy_check() -> None:
    result = check_deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_turning_https_off_is_what_the_deploy_check_flags() -> None:
    result = check_deploy(DJANGO_HTTPS="false")
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


def test_a_bad_proxy_header_stops_startup_naming_it() -> None:
    result = check_deploy(DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https")
    assert result.returncode != 0
    assert "DJANGO_SECURE_PROXY_SSL_HEADER='X-Forwarded-Proto: https' is not a header name" in result.stderr


@pytest.fixture
def https_settings(settings):
    """What DJANGO_HTTPS=true (the default without DEBUG) sets, behind a proxy sending X-Forwarded-Proto."""
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 31_536_000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = settings.SECURE_HSTS_PRELOAD = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    return settings


@pytest.mark.django_db
def test_plain_http_is_redirected_except_probes(https_settings) -> None:
    client = Client()
    redirected = client.get("/api/v1/subscriptions")
    assert redirected.status_code == 301 and redirected["Location"] == "https://testserver/api/v1/subscriptions"
    assert client.get("/health").status_code in (200, 503)
    assert client.get("/metrics").status_code == 200


@pytest.mark.django_db
def test_https_through_the_proxy_gets_hsts(https_settings) -> None:
    response = Client().get("/api/v1/subscriptions", HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 401
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"


def test_an_empty_https_setting_means_the_default() -> None:
    assert check_deploy(DJANGO_HTTPS="").returncode == 0
