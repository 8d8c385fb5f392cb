"""Subscriptions and the API keys services use to manage them."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone

API_KEY_PREFIX = "wsg_"
API_KEY_PREFIX_LENGTH = 12  # "wsg_" + 8 characters, shown in the admin and stored in clear
MAX_SERVICE_NAME = 63
MAX_SYMBOL = 40
# Private streams and liquidations can be quiet for hours; only these classes can go stale.
STALE_CLASSES = ("trade", "ticker", "orderbook", "kline")


class Scope(models.TextChoices):
    """What a service key may reach; the operator key holds every scope."""

    MARKET = "market", "market data (public streams, cached books and tickers)"
    ACCOUNT = "account", "private account data (order, execution, position, balance streams; balances)"


SCOPES = tuple(Scope.values)


def default_scopes() -> list[str]:
    """New keys get market data only; private account data is granted explicitly."""
    return [Scope.MARKET]


def hash_api_key(raw: str) -> str:
    # Keys are 256-bit random tokens, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def for_key(self, raw: str) -> ApiKey | None:
        """Return the live key matching `raw`, compared in constant time, or None."""
        if not raw.startswith(API_KEY_PREFIX) or len(raw) < API_KEY_PREFIX_LENGTH + 8:
            return None
        candidate = self.filter(prefix=raw[:API_KEY_PREFIX_LENGTH], revoked_at__isnull=True).first()
        if candidate is None or not hmac.compare_digest(candidate.key_hash, hash_api_key(raw)):
            return None
        return candidate


class ApiKey(models.Model):
    service_name = models.CharField(max_length=MAX_SERVICE_NAME, db_index=True)
    label = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=API_KEY_PREFIX_LENGTH, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    scopes = ArrayField(
        models.CharField(max_length=16, choices=Scope.choices),
        default=default_scopes,
        help_text="market: market data; account: private account data",
    )

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["service_name", "-created_at"]

    def __str__(self) -> str:
        return f"{self.service_name} {self.prefix}…"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @staticmethod
    def generate() -> tuple[str, str, str]:
        """Return a new (raw key, prefix, hash); the raw key is shown once and never stored."""
        raw = API_KEY_PREFIX + secrets.token_urlsafe(32)
        return raw, raw[:API_KEY_PREFIX_LENGTH], hash_api_key(raw)


class Subscription(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        ACTIVE = "active"
        FAILED = "failed"
        CANCELLED = "cancelled"

    LIVE_STATUSES = (Status.PENDING, Status.ACTIVE)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    service_name = models.CharField(max_length=MAX_SERVICE_NAME, db_index=True)
    channel = models.CharField(max_length=20)
    category = models.CharField(max_length=10, blank=True)
    symbol = models.CharField(max_length=MAX_SYMBOL, blank=True)
    depth = models.PositiveIntegerField(null=True, blank=True)
    interval = models.CharField(max_length=4, blank=True)
    event_class = models.CharField(max_length=20)
    bybit_topic = models.CharField(max_length=100, db_index=True)
    routing_key = models.CharField(max_length=120)
    queue_name = models.CharField(max_length=120)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # One live row per service and stream: a second POST returns the first row.
            models.UniqueConstraint(
                fields=["service_name", "routing_key"],
                condition=models.Q(status__in=["pending", "active"]),
                name="one_live_subscription_per_service_stream",
            )
        ]
        indexes = [models.Index(fields=["status", "category", "bybit_topic"])]

    def __str__(self) -> str:
        return f"{self.service_name}: {self.bybit_topic} ({self.category or 'private'}) {self.status}"

    @property
    def is_live(self) -> bool:
        return self.status in self.LIVE_STATUSES

    @staticmethod
    def stale_cutoff() -> datetime:
        return timezone.now() - timedelta(seconds=settings.MONITOR_STALE_SUBSCRIPTION_AFTER)

    @classmethod
    def stale_rows(cls) -> models.QuerySet[Subscription]:
        """Active market-data rows with no event for MONITOR_STALE_SUBSCRIPTION_AFTER seconds."""
        cutoff = cls.stale_cutoff()
        return cls.objects.filter(status=cls.Status.ACTIVE, event_class__in=STALE_CLASSES).filter(
            models.Q(last_event_at__lt=cutoff) | models.Q(last_event_at__isnull=True, updated_at__lt=cutoff)
        )

    @property
    def is_stale(self) -> bool:
        """The same rule as `stale_rows`, for one row."""
        if self.status != self.Status.ACTIVE or self.event_class not in STALE_CLASSES:
            return False
        return (self.last_event_at or self.updated_at) < self.stale_cutoff()
