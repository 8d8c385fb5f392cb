"""`/`, the admin's "View site" and mistyped API paths lead somewhere useful, never to Django's HTML 404."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import resolve

pytestmark = pytest.mark.django_db


def test_root_is_a_json_map_whose_links_all_lead_somewhere(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    index = response.json()
    assert index["docs"] == "/api/docs/" and index["subscriptions"] == "/api/v1/subscriptions"
    for name, path in index.items():
        if path.startswith("/") and "{" not in path:
            assert resolve(path).url_name != "api-not-found", name


def test_admin_view_site_opens_the_api_docs(admin_client: Client) -> None:
    page = admin_client.get("/admin/").content.decode()
    assert 'href="/api/docs/"' in page


@pytest.mark.parametrize("debug", [False, True])
def test_trailing_slash_on_an_endpoint_is_a_json_404_naming_the_right_path(
    api_client: Client, settings, debug: bool
) -> None:
    settings.DEBUG = debug  # make demo runs with DEBUG on, where Django's own 404 is a page of HTML
    response = api_client.get("/api/v1/subscriptions/")
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "not_found"
    assert "Did you mean /api/v1/subscriptions?" in body["detail"]


def test_post_to_an_unknown_api_path_is_a_json_404_not_a_csrf_page(api_client: Client) -> None:
    response = api_client.post("/api/v1/subscription", {"channel": "trades"}, format="json")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert "/api/docs/" in response.json()["detail"]


def test_docs_without_their_slash_redirect(client: Client) -> None:
    response = client.get("/api/docs")
    assert response.status_code == 301
    assert response["Location"] == "/api/docs/"


def test_a_long_unknown_path_is_not_echoed_in_full(client: Client) -> None:
    # 3,000 characters: about what gunicorn's request-line limit (4,094 bytes) lets through.
    response = client.get("/api/" + "x" * 3_000)
    assert response.status_code == 404
    assert len(response.content) < 1_000
