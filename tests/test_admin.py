"""Operators issue and revoke keys and cancel subscriptions in the admin."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from subscriptions.models import ApiKey, Subscription
from subscriptions.services import subscription_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_() -> Client:
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_issuing_a_key_shows_it_once_and_stores_only_its_hash(admin_client_: Client) -> None:
    response = admin_client_.post(
        "/admin/subscriptions/apikey/add/", {"service_name": "delta", "label": "risk team"}, follow=True
    )
    shown = re.search(r"(wsg_[A-Za-z0-9_-]{40,})", response.content.decode()).group(1)
    key = ApiKey.objects.get(service_name="delta")
    assert ApiKey.objects.for_key(shown) == key
    assert shown not in (key.key_hash, key.prefix)
    page = admin_client_.get(f"/admin/subscriptions/apikey/{key.pk}/change/").content.decode()
    assert shown not in page and key.key_hash not in page


def test_revoke_action_disables_the_key(admin_client_: Client, service_key: str) -> None:
    key = ApiKey.objects.get(service_name="alpha")
    admin_client_.post("/admin/subscriptions/apikey/", {"action": "revoke_selected", "_selected_action": [key.pk]})
    assert ApiKey.objects.for_key(service_key) is None


def test_cancel_action_cancels_selected_subscriptions(admin_client_: Client) -> None:
    row, _ = subscription_create(service_name="alpha", channel="order")
    admin_client_.post(
        "/admin/subscriptions/subscription/", {"action": "cancel_selected", "_selected_action": [row.pk]}
    )
    row.refresh_from_db()
    assert row.status == Subscription.Status.CANCELLED


def test_balances_are_read_only(admin_client_: Client) -> None:
    assert admin_client_.get("/admin/streaming/accountbalance/").status_code == 200
    assert admin_client_.get("/admin/streaming/accountbalance/add/").status_code == 403
