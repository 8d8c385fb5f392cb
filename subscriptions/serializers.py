"""API shapes: what a subscription request may contain, and what a subscription looks like."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from subscriptions import topics
from subscriptions.models import MAX_SERVICE_NAME, MAX_SYMBOL, Subscription

# An error names at most this many unknown fields, each cut to this many characters, so its size
# never grows with the body's (a 1 MB field name would otherwise come back in full).
MAX_UNKNOWN_LISTED = 10
MAX_UNKNOWN_NAME = 40


def shown_name(name: str) -> str:
    return name if len(name) <= MAX_UNKNOWN_NAME else name[:MAX_UNKNOWN_NAME] + "…"


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo never passes silently."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                errors = {shown_name(name): ["Unknown field."] for name in unknown[:MAX_UNKNOWN_LISTED]}
                if len(unknown) > MAX_UNKNOWN_LISTED:
                    shown = f"{len(unknown)} unknown fields; the first {MAX_UNKNOWN_LISTED} shown."
                    errors["non_field_errors"] = [shown]
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)


class SubscriptionRequestSerializer(StrictSerializer):
    service_name = serializers.CharField(max_length=MAX_SERVICE_NAME, required=False)
    channel = serializers.ChoiceField(choices=list(topics.CHANNELS))
    category = serializers.CharField(max_length=10, required=False, allow_blank=True, default="")
    symbol = serializers.CharField(max_length=MAX_SYMBOL, required=False, allow_blank=True, default="")
    depth = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1, max_value=10_000)
    interval = serializers.CharField(max_length=4, required=False, allow_blank=True, default="")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            if "service_name" in attrs:
                topics.check_service_name(attrs["service_name"])
            topics.resolve(attrs["channel"], attrs["category"], attrs["symbol"], attrs["depth"], attrs["interval"])
        except topics.TopicError as exc:
            raise serializers.ValidationError({exc.field: [exc.message]}) from None
        return attrs


class SubscriptionSerializer(serializers.ModelSerializer):
    stale = serializers.BooleanField(
        source="is_stale",
        read_only=True,
        help_text="active market data with no event for MONITOR_STALE_SUBSCRIPTION_AFTER seconds",
    )

    class Meta:
        model = Subscription
        fields = [
            "id", "service_name", "channel", "category", "symbol", "depth", "interval", "event_class",
            "bybit_topic", "routing_key", "queue_name", "status", "error", "created_at", "updated_at",
            "cancelled_at", "last_event_at", "stale",
        ]  # fmt: skip
        read_only_fields = fields


class CancelledCountSerializer(serializers.Serializer):
    service_name = serializers.CharField()
    cancelled = serializers.IntegerField()
