"""Swagger UI and Redoc are served by the project itself: they work offline and load nothing from a CDN."""

from __future__ import annotations

import re

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

ASSET = re.compile(r'(?:src|href)="([^"]+)"')
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
def docs_client(settings) -> Client:
    # Serve from the installed apps' static folders, as `make demo` and a checkout without collectstatic do.
    settings.WHITENOISE_USE_FINDERS = True
    return Client()


@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
def test_docs_page_loads_only_assets_this_server_serves(docs_client: Client, page: str) -> None:
    response = docs_client.get(page)
    assert response.status_code == 200
    html = response.content.decode()
    assert not re.search(r"https?://", html), "the page must not reach out to another host"
    assets = ASSET.findall(html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        assert asset.startswith("/static/drf_spectacular_sidecar/"), asset
        served = docs_client.get(asset)
        assert served.status_code == 200, asset
        assert b"".join(served.streaming_content), asset
        suffix = asset[asset.rindex(".") :]
        assert CONTENT_TYPES[suffix] in served["Content-Type"], (asset, served["Content-Type"])


@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
def test_docs_page_reads_the_projects_schema(docs_client: Client, page: str) -> None:
    assert "/api/schema/" in docs_client.get(page).content.decode()
    schema = docs_client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    assert "/api/v1/subscriptions" in schema.json()["paths"]
