"""API shapes: what a subscription request may contain, and what a subscription looks like."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
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


class StringField(serializers.CharField):
    """A JSON string taken as sent: no trimming, and a number is not turned into text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(trim_whitespace=False, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class WholeNumberField(serializers.IntegerField):
    """A JSON integer: "50", 50.0 and true are refused."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class SubscriptionRequestSerializer(StrictSerializer):
    service_name = StringField(max_length=MAX_SERVICE_NAME, required=False)
    channel = serializers.ChoiceField(
        choices=topics.CHANNEL_NAMES, error_messages={"invalid_choice": topics.UNKNOWN_CHANNEL}
    )
    category = StringField(max_length=10, required=False, allow_blank=True, default="")
    symbol = StringField(max_length=MAX_SYMBOL, required=False, allow_blank=True, default="")
    depth = WholeNumberField(required=False, allow_null=True, default=None, min_value=1, max_value=10_000)
    interval = StringField(max_length=4, required=False, allow_blank=True, default="")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            if "service_name" in attrs:
                topics.check_service_name(attrs["service_name"])
            topics.resolve(attrs["channel"], attrs["category"], attrs["symbol"], attrs["depth"], attrs["interval"])
        except topics.TopicError as exc:
            raise serializers.ValidationError({exc.field: [exc.message]}) from None
        return attrs


def symbol_pattern(channel: str, category: str) -> str:
    if category == "option":
        return (topics.BASE_COIN_PATTERN if channel == "trades" else topics.OPTION_SYMBOL_PATTERN).pattern
    return topics.SYMBOL_PATTERN.pattern


def subscription_request_schema() -> dict[str, Any]:
    """The request body as JSON Schema, one branch per channel and family of categories.

    The branches carry every rule `topics.resolve` applies, so a body the schema allows is a body
    the API accepts, and one it refuses is refused (400). Empty and null values stand for "none".
    """
    none_string = {"type": "string", "enum": [""]}
    no_depth = {"type": "integer", "nullable": True, "enum": [None]}
    service_name = {
        "type": "string",
        "pattern": topics.SERVICE_NAME_PATTERN.pattern,
        "maxLength": MAX_SERVICE_NAME,
        "description": "Required with the operator key; a service key may leave it out or name its own service.",
    }
    branches = []
    for channel in topics.CHANNELS.values():
        if channel.private:
            families = {None: [""]}
        else:
            families = {}
            for category in channel.categories:
                depths = topics.ORDERBOOK_DEPTHS[category] if channel.has_depth else ()
                families.setdefault((symbol_pattern(channel.name, category), depths), []).append(category)
        for family, categories in families.items():
            properties: dict[str, Any] = {
                "service_name": service_name,
                "channel": {"type": "string", "enum": [channel.name]},
                "category": none_string,
                "symbol": none_string,
                "depth": no_depth,
                "interval": none_string,
            }
            required = ["channel"]
            if family is not None:
                pattern, depths = family
                properties["category"] = {"type": "string", "enum": categories}
                properties["symbol"] = {"type": "string", "pattern": pattern, "maxLength": MAX_SYMBOL}
                required += ["category", "symbol"]
                if depths:
                    properties["depth"] = {"type": "integer", "enum": list(depths)}
                    required.append("depth")
                if channel.has_interval:
                    properties["interval"] = {"type": "string", "enum": list(topics.KLINE_INTERVALS)}
                    required.append("interval")
            title = f"{channel.name} ({', '.join(categories)})" if family is not None else channel.name
            branches.append(
                {
                    "type": "object",
                    "title": title,
                    "properties": properties,
                    "required": required,
                    "additionalProperties": False,
                }
            )
    # No top-level "type": drf-spectacular drops an object component without "properties".
    return {
        "required": ["channel"],
        "oneOf": branches,
        "description": (
            "What to subscribe to. Market channels need a category and a symbol (upper case, like BTCUSDT; "
            "options: BTC-27DEC24-50000-C, and option trades a base coin like BTC); order books a depth "
            "offered on the category; klines an interval. Private channels (order, execution, position, "
            "balance) take none of these. Unknown fields are refused."
        ),
    }


class SubscriptionRequestSchema(OpenApiSerializerExtension):
    target_class = "subscriptions.serializers.SubscriptionRequestSerializer"

    def map_serializer(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        return subscription_request_schema()


class SubscriptionSerializer(serializers.ModelSerializer):
    channel = serializers.ChoiceField(choices=list(topics.CHANNELS), read_only=True)
    category = serializers.ChoiceField(choices=["", *topics.CATEGORIES], read_only=True, help_text="empty: private")
    interval = serializers.ChoiceField(choices=["", *topics.KLINE_INTERVALS], read_only=True)
    event_class = serializers.ChoiceField(choices=list(topics.EVENT_CLASSES), read_only=True)
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
