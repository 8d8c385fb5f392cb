"""`manage.py create_api_key` prints a working key once."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from subscriptions.models import ApiKey

pytestmark = pytest.mark.django_db


def test_prints_a_key_that_authenticates() -> None:
    out = StringIO()
    call_command("create_api_key", "risk-engine", "--label", "desk", stdout=out, stderr=StringIO())
    raw = out.getvalue().strip()
    key = ApiKey.objects.for_key(raw)
    assert key is not None and (key.service_name, key.label) == ("risk-engine", "desk")


def test_refuses_a_bad_service_name() -> None:
    with pytest.raises(CommandError, match="service names"):
        call_command("create_api_key", "Risk Engine!", stdout=StringIO(), stderr=StringIO())
