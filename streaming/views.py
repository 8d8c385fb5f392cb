"""Read-only API over the data plane: cached market state, the account's orders, positions and balances."""

from __future__ import annotations

import time
from typing import Any

import amqp
import django_filters
import orjson
import redis
from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from streaming.lvc import book_key, hash_name, ticker_key
from streaming.models import AccountBalance, QueueSample
from streaming.monitoring.cleanup import QueueInUse, QueueMissing, queue_delete
from streaming.monitoring.readings import latest_samples, parse_queue_name
from subscriptions.authentication import AccountScope, Caller, MarketScope
from subscriptions.topics import CATEGORIES, ORDERBOOK_DEPTHS, SERVICE_NAME_PATTERN, SYMBOL_PATTERN

CACHE_TIMEOUT = 2.0


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
    if len(symbol) > 40 or not (SYMBOL_PATTERN.match(symbol) or "-" in symbol):
        raise exceptions.ValidationError({"symbol": ["not a Bybit symbol"]})


def with_age(value: dict[str, Any]) -> dict[str, Any]:
    now_ms = time.time() * 1000
    exchange_ts = value.get("exchange_ts")
    value["age_ms"] = round(now_ms - exchange_ts, 1) if exchange_ts else None
    value["cache_age_ms"] = round(now_ms - value["written_at"] * 1000, 1)
    return value


class OrderBookView(APIView):
    """The latest cached book of a subscribed topic (the deepest one cached), top `depth` levels."""

    permission_classes = [MarketScope]

    @extend_schema(parameters=[OpenApiParameter("depth", int, description="levels per side to return")])
    def get(self, request: Request, category: str, symbol: str) -> Response:
        check_market(category, symbol)
        depth = request.query_params.get("depth")
        if depth is not None and (not depth.isdigit() or not 1 <= int(depth) <= 1000):
            raise exceptions.ValidationError({"depth": ["a whole number from 1 to 1000"]})
        for offered in sorted(ORDERBOOK_DEPTHS[category], reverse=True):
            book = cached(book_key(settings.REDIS_KEY_PREFIX, category, symbol, offered))
            if book is not None:
                if depth is not None:
                    book["b"], book["a"] = book["b"][: int(depth)], book["a"][: int(depth)]
                return Response({"category": category, "symbol": symbol, **with_age(book)})
        raise exceptions.NotFound(f"No cached order book for {category} {symbol}: is a service subscribed to it?")


class TickerView(APIView):
    """The latest complete (merged) ticker of a subscribed topic."""

    permission_classes = [MarketScope]

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


def by_category_and_symbol(items: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
    category, symbol = request.query_params.get("category"), request.query_params.get("symbol")
    if category is not None and category not in CATEGORIES:
        raise exceptions.ValidationError({"category": [f"use one of {', '.join(CATEGORIES)}"]})
    return [i for i in items if category in (None, i.get("category")) and symbol in (None, i.get("symbol"))]


ACCOUNT_FILTERS = [
    OpenApiParameter("category", str, enum=list(CATEGORIES), description="only this category"),
    OpenApiParameter("symbol", str, description="only this symbol"),
]


class AccountOrdersView(APIView):
    """The account's open orders, newest first, as the gateway last saw them (stream and REST back-fill)."""

    permission_classes = [AccountScope]

    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=["open"], description="only `open` is kept"), *ACCOUNT_FILTERS]
    )
    def get(self, request: Request) -> Response:
        status = request.query_params.get("status", "open")
        if status != "open":
            raise exceptions.ValidationError(
                {"status": ["only open orders are kept; closed ones are in the order stream"]}
            )
        orders = by_category_and_symbol(cached_all("order"), request)
        orders.sort(key=lambda o: int(o.get("createdTime") or 0), reverse=True)
        return Response({"count": len(orders), "results": orders})


class AccountPositionsView(APIView):
    """The account's open positions (size above zero), as the gateway last saw them."""

    permission_classes = [AccountScope]

    @extend_schema(parameters=ACCOUNT_FILTERS)
    def get(self, request: Request) -> Response:
        positions = by_category_and_symbol(cached_all("position"), request)
        positions.sort(key=lambda p: (p.get("category", ""), p.get("symbol", ""), p.get("positionIdx", 0)))
        return Response({"count": len(positions), "results": positions})


class BalanceSerializer(serializers.ModelSerializer):
    class Meta:
        model = AccountBalance
        exclude = ["id"]


class BalanceFilter(django_filters.FilterSet):
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


def own_samples(request: Request, rows: QuerySet[QueueSample]) -> QuerySet[QueueSample]:
    caller: Caller = request.user  # type: ignore[assignment]
    return rows if caller.is_operator else rows.filter(service_name=caller.service_name)


class QueueListView(generics.ListAPIView):
    """Every queue of the calling service (all queues for the operator key), as of the monitor's last run."""

    serializer_class = QueueSampleSerializer
    filterset_fields = ["service_name", "event_class", "status"]

    def get_queryset(self) -> QuerySet[QueueSample]:
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
        parameters=[OpenApiParameter("samples", int, description="how many recent samples (1-1000, default 60)")]
    )
    def get(self, request: Request, name: str) -> Response:
        count = request.query_params.get("samples", "60")
        if not count.isdigit() or not 1 <= int(count) <= 1000:
            raise exceptions.ValidationError({"samples": ["a whole number from 1 to 1000"]})
        rows = own_samples(request, QueueSample.objects.filter(queue=name)).order_by("-taken_at")[: int(count)]
        samples = QueueSampleSerializer(rows, many=True).data
        if not samples:
            raise exceptions.NotFound(f"No samples for queue {name!r} of your service yet.")
        return Response({**samples[0], "samples": samples})

    @extend_schema(request=None, responses={200: QueueDeletedSerializer})
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
