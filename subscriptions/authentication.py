"""Who calls the API: X-API-Key authentication (a service's key, or the operator's), failed-attempt
throttling per client address, and the scope permissions (market data, private account data)."""

from __future__ import annotations

import functools
import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from django.conf import settings
from django.http import HttpRequest
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from redis.backoff import NoBackoff
from redis.retry import Retry
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from subscriptions import topics
from subscriptions.models import SCOPES, ApiKey, Scope

log = structlog.get_logger(__name__)

HEADER = "X-API-Key"
# last_used_at is informative; writing it on every request would make each GET a write.
LAST_USED_RESOLUTION_SECONDS = 60
# A Redis that does not answer must not hold up the API: the throttle is skipped (fail open).
FAILURE_STORE_TIMEOUT = 0.5


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: one service, or the operator (service_name is None), with the key's scopes."""

    service_name: str | None
    key_prefix: str
    scopes: frozenset[str] = field(default=frozenset(SCOPES))

    is_authenticated = True

    @property
    def is_operator(self) -> bool:
        return self.service_name is None

    def can_act_for(self, service_name: str) -> bool:
        return self.is_operator or self.service_name == service_name

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


def client_ip(request: HttpRequest) -> str | None:
    """The caller's address: REMOTE_ADDR, or behind TRUSTED_PROXY_COUNT proxies the one they forwarded.

    Also Axes' AXES_CLIENT_IP_CALLABLE, so the admin lockout and the API throttle agree on who is who.
    None when the request carries no address (Django's test client logging in directly).
    """
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    count = settings.TRUSTED_PROXY_COUNT
    if count and forwarded:
        # Each proxy appends the address it saw; only the last `count` entries are trustworthy.
        addresses = [a.strip() for a in forwarded.split(",") if a.strip()]
        if addresses and is_ip(candidate := addresses[-min(count, len(addresses))]):
            return candidate
    address = request.META.get("REMOTE_ADDR")
    return address if address and is_ip(address) else None


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@functools.cache
def failure_store(url: str) -> redis.Redis:
    """One pooled client per Redis URL for the whole process; one retry covers a connection Redis closed."""
    return redis.Redis.from_url(
        url,
        socket_timeout=FAILURE_STORE_TIMEOUT,
        socket_connect_timeout=FAILURE_STORE_TIMEOUT,
        retry=Retry(NoBackoff(), 1),
    )


class AuthFailures:
    """Failed key attempts per client address in Redis: a fixed window of AUTH_FAILURE_WINDOW seconds.

    Only failures count (DRF's throttles count every request). Past AUTH_FAILURE_LIMIT the address
    gets 429 until the window ends, whatever key it sends, so a guess cannot be confirmed meanwhile.
    """

    def __init__(self, client: redis.Redis, prefix: str, limit: int, window: int) -> None:
        self.client, self.prefix, self.limit, self.window = client, prefix, limit, window

    @classmethod
    def from_settings(cls) -> AuthFailures:
        return cls(
            failure_store(settings.REDIS_URL),
            settings.REDIS_KEY_PREFIX,
            settings.AUTH_FAILURE_LIMIT,
            settings.AUTH_FAILURE_WINDOW,
        )

    def key(self, address: str) -> str:
        return f"{self.prefix}auth-failures:{address}"

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again; None while it is under the limit (or the store is down)."""
        if not self.limit:
            return None
        try:
            count, ttl = self.client.pipeline(transaction=False).get(self.key(address)).ttl(self.key(address)).execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("auth.throttle_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
            return None
        if count is None or int(count) < self.limit:
            return None
        return max(int(ttl), 1)

    def record(self, address: str) -> None:
        """Count one failure; the first one of a window starts its clock."""
        if not self.limit:
            return
        key = self.key(address)
        try:
            self.client.pipeline().set(key, 0, ex=self.window, nx=True).incr(key).execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("auth.throttle_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Caller, str] | None:
        raw = request.headers.get(HEADER)
        if raw is None:
            return None
        failures, address = AuthFailures.from_settings(), client_ip(request) or "unknown"
        wait = failures.retry_after(address)
        if wait is not None:
            raise exceptions.Throttled(wait, f"Too many failed API-key attempts from {address}; retry in {wait} s.")
        raw = raw.strip()
        operator_key = settings.WS_GATEWAY_API_KEY
        if operator_key and hmac.compare_digest(raw.encode(), operator_key.encode()):
            return Caller(None, "operator"), raw
        key = ApiKey.objects.for_key(raw)
        if key is None:
            failures.record(address)
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.", code="invalid_api_key")
        now = timezone.now()
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return Caller(key.service_name, key.prefix, frozenset(key.scopes)), raw

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


class HasScope(permissions.BasePermission):
    """Allows a caller whose key holds `scope` (the operator and staff hold every scope); 401 without a key.

    Use a subclass naming the scope: `permission_classes = [AccountScope]` on any view of private
    account data (balances, /api/v1/account/*). Refusals are 403 with code `missing_scope`.
    """

    scope: str = ""
    code = "missing_scope"

    def has_permission(self, request: Request, view: Any) -> bool:
        caller = request.user
        return isinstance(caller, Caller) and caller.has_scope(self.scope)

    @property
    def message(self) -> str:
        return f"This API key lacks the {self.scope!r} scope."


class AccountScope(HasScope):
    """Private account data: order, execution, position and wallet streams, balances."""

    scope = Scope.ACCOUNT.value


class MarketScope(HasScope):
    """Market data: public streams and the cached books and tickers."""

    scope = Scope.MARKET.value


def channel_scope(channel: str) -> str:
    """The scope a subscription to `channel` needs."""
    return (Scope.ACCOUNT if topics.CHANNELS[channel].private else Scope.MARKET).value


class SubscribeScope(HasScope):
    """A POST subscribing to a channel needs that channel's scope; other requests pass."""

    def has_permission(self, request: Request, view: Any) -> bool:
        channel = request.data.get("channel") if request.method == "POST" and hasattr(request.data, "get") else None
        if not isinstance(channel, str) or channel not in topics.CHANNELS:
            return True  # nothing to subscribe to: validation answers with a 400
        self.scope = channel_scope(channel)
        return super().has_permission(request, view)


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "subscriptions.authentication.ApiKeyAuthentication"
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {"type": "apiKey", "in": "header", "name": HEADER}
