"""Data-plane state kept in PostgreSQL: account balances from Bybit's wallet topic."""

from __future__ import annotations

from django.db import models

# Bybit sends amounts as decimal strings; NUMERIC(40, 18) holds any of them exactly.
AMOUNT = {"max_digits": 40, "decimal_places": 18, "null": True, "blank": True}


class AccountBalance(models.Model):
    """The latest wallet state per (account type, coin); an older event never overwrites a newer one."""

    account_type = models.CharField(max_length=20)
    coin = models.CharField(max_length=20)
    wallet_balance = models.DecimalField(**AMOUNT)
    equity = models.DecimalField(**AMOUNT)
    available_to_withdraw = models.DecimalField(**AMOUNT)
    usd_value = models.DecimalField(**AMOUNT)
    borrow_amount = models.DecimalField(**AMOUNT)
    accrued_interest = models.DecimalField(**AMOUNT)
    total_order_im = models.DecimalField(**AMOUNT)
    total_position_im = models.DecimalField(**AMOUNT)
    total_position_mm = models.DecimalField(**AMOUNT)
    unrealised_pnl = models.DecimalField(**AMOUNT)
    cum_realised_pnl = models.DecimalField(**AMOUNT)
    locked = models.DecimalField(**AMOUNT)
    bonus = models.DecimalField(**AMOUNT)
    collateral_switch = models.BooleanField(null=True, blank=True)
    margin_collateral = models.BooleanField(null=True, blank=True)
    # Account-level figures of the same wallet message, repeated per coin row for easy reads.
    total_equity = models.DecimalField(**AMOUNT)
    total_wallet_balance = models.DecimalField(**AMOUNT)
    total_margin_balance = models.DecimalField(**AMOUNT)
    total_available_balance = models.DecimalField(**AMOUNT)
    total_perp_upl = models.DecimalField(**AMOUNT)
    total_initial_margin = models.DecimalField(**AMOUNT)
    total_maintenance_margin = models.DecimalField(**AMOUNT)
    account_im_rate = models.DecimalField(**AMOUNT)
    account_mm_rate = models.DecimalField(**AMOUNT)
    account_ltv = models.DecimalField(**AMOUNT)
    exchange_ts = models.DateTimeField(help_text="Bybit's creationTime of the wallet message")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["account_type", "coin"]
        constraints = [models.UniqueConstraint(fields=["account_type", "coin"], name="one_balance_per_account_coin")]

    def __str__(self) -> str:
        return f"{self.account_type} {self.coin}: {self.wallet_balance}"


class QueueSample(models.Model):
    """One reading of a service queue by the monitor (beat task), kept for MONITOR_SAMPLE_RETENTION_HOURS."""

    class Status(models.TextChoices):
        OK = "ok"
        WARNING = "warning"
        CRITICAL = "critical"

    queue = models.CharField(max_length=200)
    service_name = models.CharField(max_length=64)
    event_class = models.CharField(max_length=20)
    taken_at = models.DateTimeField()
    source = models.CharField(max_length=12, help_text="management (HTTP API) or declare (passive declare)")
    ready = models.BigIntegerField()
    unacked = models.BigIntegerField(null=True, blank=True)
    consumers = models.IntegerField()
    max_length = models.BigIntegerField(null=True, blank=True)
    fill = models.FloatField(null=True, blank=True, help_text="0..1 of x-max-length or x-max-length-bytes")
    publish_rate = models.FloatField(null=True, blank=True, help_text="messages/s into the queue")
    consume_rate = models.FloatField(null=True, blank=True, help_text="messages/s delivered to consumers")
    dropped_estimate = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OK)
    alerts = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-taken_at"]
        get_latest_by = "taken_at"
        indexes = [models.Index(fields=["queue", "-taken_at"]), models.Index(fields=["taken_at"])]

    def __str__(self) -> str:
        return f"{self.queue} {self.depth} ({self.status})"

    @property
    def depth(self) -> int:
        return self.ready + (self.unacked or 0)


class QueueStatus(QueueSample):
    """The latest sample of each queue (the admin's overview)."""

    class Meta:
        proxy = True
        verbose_name = "queue (latest sample)"
        verbose_name_plural = "queues (latest sample)"
