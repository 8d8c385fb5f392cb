"""Key scopes: a key reaches market data, private account data, or both; the operator reaches all."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from rest_framework.test import APIClient

from subscriptions.models import ApiKey, Subscription
from subscriptions.services import api_key_issue

URL = "/api/v1/subscriptions"
TRADES = {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"}


def client_for(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=raw)
    return client


@pytest.fixture
def market_client(db) -> APIClient:
    """A key issued with the defaults: market data only."""
    return client_for(api_key_issue(service_name="mkt")[1])


@pytest.fixture
def account_client(db) -> APIClient:
    return client_for(api_key_issue(service_name="acct", scopes=["account"])[1])


@pytest.mark.django_db
@pytest.mark.parametrize("channel", ["order", "execution", "position", "balance"])
def test_a_market_key_cannot_subscribe_to_private_streams(market_client: APIClient, channel: str) -> None:
    response = market_client.post(URL, {"channel": channel}, format="json")
    assert response.status_code == 403
    assert response.json() == {"code": "missing_scope", "detail": "This API key lacks the 'account' scope."}
    assert not Subscription.objects.exists()


@pytest.mark.django_db
def test_a_market_key_reads_market_data_and_not_balances(market_client: APIClient, redis_prefix: str) -> None:
    assert market_client.post(URL, TRADES, format="json").status_code == 201
    # Nothing cached yet: a 404, which means the scope let it through.
    assert market_client.get("/api/v1/market/ticker/linear/BTCUSDT").json()["code"] == "not_found"
    response = market_client.get("/api/v1/balances")
    assert response.status_code == 403 and response.json()["code"] == "missing_scope"


@pytest.mark.django_db
def test_an_account_key_reads_private_data_and_not_market_data(account_client: APIClient, redis_prefix: str) -> None:
    assert account_client.post(URL, {"channel": "order"}, format="json").status_code == 201
    assert account_client.get("/api/v1/balances").status_code == 200
    refused = account_client.post(URL, TRADES, format="json")
    assert refused.status_code == 403 and refused.json()["detail"] == "This API key lacks the 'market' scope."
    assert account_client.get("/api/v1/market/orderbook/linear/BTCUSDT").status_code == 403
    # Its own rows stay visible and cancellable whatever they are.
    assert account_client.get(URL).json()["count"] == 1


@pytest.mark.django_db
def test_the_operator_holds_every_scope(operator_client: APIClient) -> None:
    created = operator_client.post(URL, {"service_name": "mkt", "channel": "position"}, format="json")
    assert created.status_code == 201
    assert operator_client.get("/api/v1/balances").status_code == 200


@pytest.mark.django_db
def test_without_a_key_account_endpoints_are_401_not_403() -> None:
    response = APIClient().get("/api/v1/balances")
    assert response.status_code == 401 and response.json()["code"] == "not_authenticated"


@pytest.mark.django_db
def test_create_api_key_grants_market_by_default_and_scopes_on_request() -> None:
    out = StringIO()
    call_command("create_api_key", "quotes", stdout=out, stderr=StringIO())
    assert ApiKey.objects.for_key(out.getvalue().strip()).scopes == ["market"]
    out, err = StringIO(), StringIO()
    call_command("create_api_key", "desk", "--scope", "account", "--scope", "market", stdout=out, stderr=err)
    assert ApiKey.objects.for_key(out.getvalue().strip()).scopes == ["market", "account"]
    assert "scopes market, account" in err.getvalue()
    call_command("create_api_key", "risk", "--scope", "account,market", stdout=StringIO(), stderr=StringIO())
    assert ApiKey.objects.get(service_name="risk").scopes == ["market", "account"]
    with pytest.raises(CommandError, match="scopes must be one or more of market, account; got trading"):
        call_command("create_api_key", "bad", "--scope", "trading", stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
def test_the_admin_issues_keys_with_scopes_and_changes_them() -> None:
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw"))
    page = admin.post(
        "/admin/subscriptions/apikey/add/", {"service_name": "desk", "scopes": ["market", "account"]}, follow=True
    )
    raw = re.search(r"(wsg_[A-Za-z0-9_-]{40,})", page.content.decode()).group(1)
    key = ApiKey.objects.get(service_name="desk")
    assert key.scopes == ["market", "account"]
    assert client_for(raw).get("/api/v1/balances").status_code == 200

    admin.post(f"/admin/subscriptions/apikey/{key.pk}/change/", {"label": "", "scopes": ["market"]})
    key.refresh_from_db()
    assert key.scopes == ["market"]
    assert client_for(raw).get("/api/v1/balances").status_code == 403  # at once, no new key needed


@pytest.mark.django_db(transaction=True)
def test_keys_from_before_scopes_keep_market_and_account() -> None:
    executor = MigrationExecutor(connection)
    before = [("subscriptions", "0001_initial")]
    executor.migrate(before)
    old_key = executor.loader.project_state(before).apps.get_model("subscriptions", "ApiKey")
    old_key.objects.create(service_name="legacy", prefix="wsg_legacy01", key_hash="0" * 64)

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert ApiKey.objects.get(service_name="legacy").scopes == ["market", "account"]
    assert api_key_issue(service_name="fresh")[0].scopes == ["market"]
