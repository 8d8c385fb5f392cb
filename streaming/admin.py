"""Admin views of what the data plane keeps: balances and queue samples, read-only; deleting unused queues."""

from __future__ import annotations

import amqp
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from streaming.models import AccountBalance, QueueSample, QueueStatus
from streaming.monitoring.cleanup import QueueInUse, QueueMissing, queue_delete
from streaming.monitoring.readings import latest_samples


class ReadOnlyAdmin(admin.ModelAdmin):
    """Written by the gateway or the monitor, never by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(AccountBalance)
class AccountBalanceAdmin(ReadOnlyAdmin):
    """Balances are written by the gateway from Bybit's wallet topic: read-only here."""

    list_display = ["account_type", "coin", "wallet_balance", "equity", "available_to_withdraw", "exchange_ts"]
    list_filter = ["account_type", "coin"]
    search_fields = ["coin"]


@admin.register(QueueStatus)
class QueueStatusAdmin(ReadOnlyAdmin):
    """The monitor's latest reading of every gateway queue: what an operator checks first."""

    list_display = [
        "queue", "service_name", "event_class", "status", "depth", "consumers", "max_length", "fill_percent",
        "publish_rate", "consume_rate", "dropped_estimate", "alerts", "taken_at",
    ]  # fmt: skip
    list_filter = ["status", "event_class", "service_name"]
    search_fields = ["queue", "service_name"]
    actions = ["delete_queues"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[QueueSample]:
        return latest_samples()

    @admin.action(description="Delete the selected queues and their messages (refused while subscribed)")
    def delete_queues(self, request: HttpRequest, queryset: QuerySet[QueueSample]) -> None:
        for sample in queryset:
            try:
                discarded = queue_delete(queue=sample.queue)
            except QueueInUse as exc:
                self.message_user(request, f"Kept {sample.queue}: {exc}.", messages.ERROR)
            except QueueMissing:
                self.message_user(request, f"{sample.queue} was already gone.", messages.INFO)
            except (OSError, amqp.exceptions.AMQPError) as exc:
                self.message_user(request, f"Kept {sample.queue}: RabbitMQ did not answer ({exc}).", messages.ERROR)
            else:
                self.message_user(request, f"Deleted {sample.queue} ({discarded} messages).", messages.SUCCESS)

    @admin.display(description="fill %")
    def fill_percent(self, sample: QueueSample) -> str:
        return "-" if sample.fill is None else f"{sample.fill * 100:.1f}"


@admin.register(QueueSample)
class QueueSampleAdmin(ReadOnlyAdmin):
    """Every stored sample (pruned after MONITOR_SAMPLE_RETENTION_HOURS by a beat task)."""

    list_display = ["queue", "status", "depth", "consumers", "fill", "publish_rate", "consume_rate", "taken_at"]
    list_filter = ["status", "event_class", "service_name"]
    search_fields = ["queue"]
    date_hierarchy = "taken_at"
