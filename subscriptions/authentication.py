"""X-API-Key authentication: a service's own key, or the operator key that acts for all."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from subscriptions.models import ApiKey

HEADER = "X-API-Key"
# last_used_at is informative; writing it on every request would make each GET a write.
LAST_USED_RESOLUTION_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: one service, or the operator (service_name is None)."""

    service_name: str | None
    key_prefix: str

    is_authenticated = True

    @property
    def is_operator(self) -> bool:
        return self.service_name is None

    def can_act_for(self, service_name: str) -> bool:
        return self.is_operator or self.service_name == service_name


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Caller, str] | None:
        raw = request.headers.get(HEADER)
        if raw is None:
            return None
        raw = raw.strip()
        operator_key = settings.WS_GATEWAY_API_KEY
        if operator_key and hmac.compare_digest(raw.encode(), operator_key.encode()):
            return Caller(None, "operator"), raw
        key = ApiKey.objects.for_key(raw)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.", code="invalid_api_key")
        now = timezone.now()
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return Caller(key.service_name, key.prefix), raw

    def authenticate_header(self, request: Request) -> str:
        # Any value here makes DRF answer 401 (not 403) to a missing or wrong key.
        return HEADER


class StaffSessionAuthentication(authentication.SessionAuthentication):
    """Staff logged into the admin use the browsable API as the operator (CSRF enforced)."""

    def authenticate(self, request: Request) -> tuple[Caller, None] | None:
        result = super().authenticate(request)
        if result is None or not result[0].is_staff:
            return None
        return Caller(None, f"staff:{result[0].get_username()}"), None


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "subscriptions.authentication.ApiKeyAuthentication"
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {"type": "apiKey", "in": "header", "name": HEADER}
