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
