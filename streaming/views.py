"""Read-only API over the data plane: cached market state, the account's orders, positions and balances."""

from __future__ import annotations

import re
import time
from typing import Any

import amqp
import django_filters
import orjson
import redis
from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from streaming.marketstate import book_key, hash_name, ticker_key
from streaming.models import AccountBalance, QueueSample
from streaming.monitoring.cleanup import QueueInUse, QueueMissing, queue_delete
from streaming.monitoring.readings import latest_samples, parse_queue_name
from subscriptions.authentication import AccountScope, Caller, MarketScope
from subscriptions.models import Subscription
from subscriptions.queryparams import ChoiceFilter, pattern_filter, query_int
from subscriptions.topics import (
    ANY_SYMBOL_PATTERN,
    CATEGORIES,
    EVENT_CLASSES,
    ORDERBOOK_DEPTHS,
    QUEUE_PREFIX,
    SERVICE_NAME_PATTERN,
)

CACHE_TIMEOUT = 2.0
MAX_BOOK_DEPTH = 1000
MAX_SAMPLES = 1000
WALLET_NAME_PATTERN = re.compile(r"^[A-Z0-9]{1,20}$")
QUEUE_NAME_PATTERN = (
    rf"^{re.escape(QUEUE_PREFIX)}\.{SERVICE_NAME_PATTERN.pattern[1:-1]}\.(?:{'|'.join(EVENT_CLASSES)})$"
)


def cached(key: tuple[str, str]) -> dict[str, Any] | None:
    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=CACHE_TIMEOUT, socket_connect_timeout=CACHE_TIMEOUT
    )
    try:
        raw = client.hget(*key)
    finally:
        client.close()
    return orjson.loads(raw) if raw else None


def check_market(category: str, symbol: str) -> None:
    if category not in CATEGORIES:
        raise exceptions.ValidationError({"category": [f"use one of {', '.join(CATEGORIES)}"]})
    if not ANY_SYMBOL_PATTERN.match(symbol):
        raise exceptions.ValidationError({"symbol": ["not a Bybit symbol"]})


def with_age(value: dict[str, Any]) -> dict[str, Any]:
    now_ms = time.time() * 1000
    exchange_ts = value.get("exchange_ts")
    value["age_ms"] = round(now_ms - exchange_ts, 1) if exchange_ts else None
    value["cache_age_ms"] = round(now_ms - value["written_at"] * 1000, 1)
    return value


MARKET_PARAMETERS = [
    OpenApiParameter(
        "category",
        {"type": "string", "enum": list(CATEGORIES), "example": "linear"},
        OpenApiParameter.PATH,
        required=True,
    ),
    OpenApiParameter(
        "symbol",
        {"type": "string", "pattern": ANY_SYMBOL_PATTERN.pattern, "example": "BTCUSDT"},
        OpenApiParameter.PATH,
        required=True,
        description="upper case, like BTCUSDT; options like BTC-27DEC24-50000-C",
    ),
]
CACHE_AGE_FIELDS = {
    "category": serializers.ChoiceField(choices=list(CATEGORIES)),
    "symbol": serializers.CharField(),
    "exchange_ts": serializers.IntegerField(allow_null=True, help_text="Bybit's ts of the latest event, ms"),
    "written_at": serializers.FloatField(help_text="when the gateway wrote it to the cache, Unix seconds"),
    "age_ms": serializers.FloatField(allow_null=True, help_text="now - exchange_ts"),
    "cache_age_ms": serializers.FloatField(help_text="now - written_at"),
}


def levels(side: str) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.ListField(child=serializers.CharField(), min_length=2, max_length=2),
        help_text=f"{side}: [price, size] as Bybit writes them, best first",
    )


ORDER_BOOK = inline_serializer(
    "OrderBook",
    {
        **CACHE_AGE_FIELDS,
        "b": levels("bids"),
        "a": levels("asks"),
        "u": serializers.IntegerField(allow_null=True, help_text="Bybit's update id"),
        "seq": serializers.IntegerField(allow_null=True, help_text="Bybit's cross sequence"),
        "consistent": serializers.BooleanField(help_text="false while a gap waits for a fresh snapshot"),
        "depth": serializers.IntegerField(help_text="the depth of the Bybit topic the book comes from"),
    },
)
TICKER = inline_serializer(
    "Ticker", {**CACHE_AGE_FIELDS, "data": serializers.DictField(help_text="the merged ticker, Bybit's fields")}
)
NOT_CACHED = "nothing cached for it: no service is subscribed to that topic, or no event came yet"


class OrderBookView(APIView):
    """The latest cached book of a subscribed topic (the deepest one cached), top `depth` levels."""

    permission_classes = [MarketScope]

    @extend_schema(
        parameters=[
            *MARKET_PARAMETERS,
            OpenApiParameter(
                "depth",
                {"type": "integer", "minimum": 1, "maximum": MAX_BOOK_DEPTH},
                description="levels per side to return (default: all cached, LVC_BOOK_DEPTH)",
            ),
        ],
        responses={200: ORDER_BOOK, 404: OpenApiResponse(description=NOT_CACHED)},
    )
    def get(self, request: Request, category: str, symbol: str) -> Response:
        check_market(category, symbol)
        depth = query_int(request, "depth", MAX_BOOK_DEPTH, 1, MAX_BOOK_DEPTH)
        for offered in sorted(ORDERBOOK_DEPTHS[category], reverse=True):
            book = cached(book_key(settings.REDIS_KEY_PREFIX, category, symbol, offered))
            if book is not None:
                book["b"], book["a"] = book["b"][:depth], book["a"][:depth]
                return Response({"category": category, "symbol": symbol, **with_age(book)})
        raise exceptions.NotFound(f"No cached order book for {category} {symbol}: is a service subscribed to it?")


class TickerView(APIView):
    """The latest complete (merged) ticker of a subscribed topic."""

    permission_classes = [MarketScope]

    @extend_schema(parameters=MARKET_PARAMETERS, responses={200: TICKER, 404: OpenApiResponse(description=NOT_CACHED)})
    def get(self, request: Request, category: str, symbol: str) -> Response:
        check_market(category, symbol)
        ticker = cached(ticker_key(settings.REDIS_KEY_PREFIX, category, symbol))
        if ticker is None:
            raise exceptions.NotFound(f"No cached ticker for {category} {symbol}: is a service subscribed to it?")
        return Response({"category": category, "symbol": symbol, **with_age(ticker)})


def cached_all(kind: str) -> list[dict[str, Any]]:
    """Every value of one cache hash (the account's open orders or positions), as the gateway wrote them."""
    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=CACHE_TIMEOUT, socket_connect_timeout=CACHE_TIMEOUT
    )
    try:
        values = client.hvals(hash_name(settings.REDIS_KEY_PREFIX, kind))
    finally:
        client.close()
    return [orjson.loads(raw)["data"] for raw in values]


NOT_KEPT = "the gateway keeps this state only while some service subscribes to the channel; none does"


def check_kept(event_class: str) -> None:
    """The account state is kept only while the gateway streams that class: else say so, never serve stale rows."""
    if not Subscription.objects.filter(event_class=event_class, status__in=Subscription.LIVE_STATUSES).exists():
        raise exceptions.NotFound(
            f"No {event_class} state is kept: the gateway keeps it only while a service subscribes to the "
            f"{event_class} channel, and none does."
        )


def by_category_and_symbol(items: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
    category, symbol = request.query_params.get("category"), request.query_params.get("symbol")
    if category is not None and category not in CATEGORIES:
        raise exceptions.ValidationError({"category": [f"use one of {', '.join(CATEGORIES)}"]})
    return [i for i in items if category in (None, i.get("category")) and symbol in (None, i.get("symbol"))]


ACCOUNT_LIST = inline_serializer(
    "AccountList",
    {
        "count": serializers.IntegerField(),
        "results": serializers.ListField(child=serializers.DictField(), help_text="Bybit's items, as streamed"),
    },
)
ACCOUNT_FILTERS = [
    OpenApiParameter("category", str, enum=list(CATEGORIES), description="only this category"),
    OpenApiParameter("symbol", str, description="only this symbol"),
]


class AccountOrdersView(APIView):
    """The account's open orders, newest first, as the gateway last saw them (stream and REST back-fill)."""

    permission_classes = [AccountScope]

    @extend_schema(
        parameters=[
            OpenApiParameter("status", str, enum=["open"], description="only `open` is kept"),
            *ACCOUNT_FILTERS,
        ],
        responses={200: ACCOUNT_LIST, 404: OpenApiResponse(description=NOT_KEPT)},
    )
    def get(self, request: Request) -> Response:
        status = request.query_params.get("status", "open")
        if status != "open":
            raise exceptions.ValidationError(
                {"status": ["only open orders are kept; closed ones are in the order stream"]}
            )
        check_kept("order")
        orders = by_category_and_symbol(cached_all("order"), request)
        orders.sort(key=lambda o: int(o.get("createdTime") or 0), reverse=True)
        return Response({"count": len(orders), "results": orders})


class AccountPositionsView(APIView):
    """The account's open positions (size above zero), as the gateway last saw them."""

    permission_classes = [AccountScope]

    @extend_schema(
        parameters=ACCOUNT_FILTERS, responses={200: ACCOUNT_LIST, 404: OpenApiResponse(description=NOT_KEPT)}
    )
    def get(self, request: Request) -> Response:
        check_kept("position")
        positions = by_category_and_symbol(cached_all("position"), request)
        positions.sort(key=lambda p: (p.get("category", ""), p.get("symbol", ""), p.get("positionIdx", 0)))
        return Response({"count": len(positions), "results": positions})


class BalanceSerializer(serializers.ModelSerializer):
    class Meta:
        model = AccountBalance
        exclude = ["id"]


class BalanceFilter(django_filters.FilterSet):
    account_type = pattern_filter(WALLET_NAME_PATTERN, "Bybit's accountType, e.g. UNIFIED")
    coin = pattern_filter(WALLET_NAME_PATTERN, "e.g. USDT")

    class Meta:
        model = AccountBalance
        fields = ["account_type", "coin"]


class BalanceListView(generics.ListAPIView):
    """Wallet balances per account type and coin, as of Bybit's latest wallet event."""

    permission_classes = [AccountScope]

    queryset = AccountBalance.objects.all()
    serializer_class = BalanceSerializer
    filterset_class = BalanceFilter


class QueueSampleSerializer(serializers.ModelSerializer):
    event_class = serializers.ChoiceField(choices=list(EVENT_CLASSES))
    depth = serializers.IntegerField(help_text="ready + unacked")
    fill_percent = serializers.SerializerMethodField()

    class Meta:
        model = QueueSample
        fields = [
            "queue", "service_name", "event_class", "status", "alerts", "depth", "ready", "unacked", "consumers",
            "max_length", "fill_percent", "publish_rate", "consume_rate", "dropped_estimate", "source", "taken_at",
        ]  # fmt: skip

    def get_fill_percent(self, sample: QueueSample) -> float | None:
        return None if sample.fill is None else round(sample.fill * 100, 2)


class QueueDetailSerializer(QueueSampleSerializer):
    samples = QueueSampleSerializer(many=True, help_text="the recent samples, newest first (the first is the above)")

    class Meta(QueueSampleSerializer.Meta):
        fields = [*QueueSampleSerializer.Meta.fields, "samples"]


def own_samples(request: Request, rows: QuerySet[QueueSample]) -> QuerySet[QueueSample]:
    caller: Caller = request.user  # type: ignore[assignment]
    return rows if caller.is_operator else rows.filter(service_name=caller.service_name)


class QueueFilter(django_filters.FilterSet):
    service_name = pattern_filter(SERVICE_NAME_PATTERN, "only this service's queues (the operator key sees all)")
    event_class = ChoiceFilter(EVENT_CLASSES)
    status = ChoiceFilter(QueueSample.Status.values)

    class Meta:
        model = QueueSample
        fields = ["service_name", "event_class", "status"]


class QueueListView(generics.ListAPIView):
    """Every queue of the calling service (all queues for the operator key), as of the monitor's last run."""

    serializer_class = QueueSampleSerializer
    filterset_class = QueueFilter

    def get_queryset(self) -> QuerySet[QueueSample]:
        if getattr(self, "swagger_fake_view", False):
            return QueueSample.objects.none()  # schema generation: no query, the same schema for every caller
        return own_samples(self.request, latest_samples())


class QueueDeletedSerializer(serializers.Serializer):
    queue = serializers.CharField()
    messages_discarded = serializers.IntegerField(help_text="messages that were still in the queue")


class Conflict(exceptions.APIException):
    status_code = 409
    default_code = "conflict"
    default_detail = "The request conflicts with the current state."


class Unavailable(exceptions.APIException):
    status_code = 503
    default_code = "unavailable"
    default_detail = "A service this request needs did not answer."


class QueueDetailView(APIView):
    """One queue: its latest figures and its recent samples, newest first."""

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "name",
                {"type": "string", "pattern": QUEUE_NAME_PATTERN, "example": "ws-gateway.demo.trade"},
                OpenApiParameter.PATH,
                required=True,
                description="ws-gateway.<service>.<class>",
            ),
            OpenApiParameter(
                "samples",
                {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES, "default": 60},
                description="how many recent samples",
            ),
        ],
        responses={
            200: QueueDetailSerializer,
            404: OpenApiResponse(description="no sample of that queue (of the calling service) yet"),
        },
    )
    def get(self, request: Request, name: str) -> Response:
        parsed = parse_queue_name(name)
        if parsed is None or not SERVICE_NAME_PATTERN.match(parsed[0]):
            raise exceptions.ValidationError({"name": ["not a ws-gateway queue: ws-gateway.<service>.<class>"]})
        count = query_int(request, "samples", 60, 1, MAX_SAMPLES)
        rows = own_samples(request, QueueSample.objects.filter(queue=name)).order_by("-taken_at")[:count]
        samples = QueueSampleSerializer(rows, many=True).data
        if not samples:
            raise exceptions.NotFound(f"No samples for queue {name!r} of your service yet.")
        return Response({**samples[0], "samples": samples})

    @extend_schema(
        request=None,
        responses={
            200: QueueDeletedSerializer,
            404: OpenApiResponse(description="`not_found`: no such queue of the calling service"),
            409: OpenApiResponse(description="`queue_in_use`: a live subscription still uses it"),
            503: OpenApiResponse(description="`rabbitmq_unavailable`: nothing was deleted"),
        },
    )
    def delete(self, request: Request, name: str) -> Response:
        """Delete one of the caller's queues and its messages; 409 while a live subscription uses it."""
        caller: Caller = request.user  # type: ignore[assignment]
        parsed = parse_queue_name(name)
        if parsed is None or not SERVICE_NAME_PATTERN.match(parsed[0]) or not caller.can_act_for(parsed[0]):
            raise exceptions.NotFound("No such queue of your service.")
        try:
            discarded = queue_delete(queue=name)
        except QueueInUse as exc:
            raise Conflict(f"{exc}.", code="queue_in_use") from None
        except QueueMissing:
            raise exceptions.NotFound("No such queue of your service.") from None
        except (OSError, amqp.exceptions.AMQPError):
            raise Unavailable("RabbitMQ did not answer; nothing was deleted.", code="rabbitmq_unavailable") from None
        return Response({"queue": name, "messages_discarded": discarded})
