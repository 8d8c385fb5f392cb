from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from streaming.models import AccountBalance


@admin.register(AccountBalance)
class AccountBalanceAdmin(admin.ModelAdmin):
    """Balances are written by the gateway from Bybit's wallet topic: read-only here."""

    list_display = ["account_type", "coin", "wallet_balance", "equity", "available_to_withdraw", "exchange_ts"]
    list_filter = ["account_type", "coin"]
    search_fields = ["coin"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AccountBalance | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AccountBalance | None = None) -> bool:
        return False
