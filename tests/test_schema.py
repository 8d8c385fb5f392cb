"""The API documents itself: a valid OpenAPI 3 schema, docs and the browsable API."""

from __future__ import annotations

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.test import Client
from openapi_spec_validator import validate

pytestmark = pytest.mark.django_db


def test_schema_is_valid_openapi_3_and_documents_the_key_header() -> None:
    response = Client().get("/api/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    validate(schema)
    assert schema["openapi"].startswith("3.")
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert "/api/v1/subscriptions/by-service/{service_name}" in schema["paths"]


def test_docs_page_and_browsable_api_render() -> None:
    assert Client().get("/api/docs/").status_code == 200
    staff = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(staff)
    page = client.get("/api/v1/subscriptions", HTTP_ACCEPT="text/html")
    assert page.status_code == 200 and b"Subscription" in page.content
