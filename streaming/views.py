"""Read-only API over the data plane: cached market state and balances."""

from __future__ import annotations

import time
from typing import Any

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

from streaming.lvc import book_key, ticker_key
from streaming.models import AccountBalance, QueueSample
from streaming.monitoring.readings import latest_samples, parse_queue_name
from subscriptions.authentication import Caller
from subscriptions.pagination import query_int
from subscriptions.topics import (
    CATEGORIES,
    OPTION_SYMBOL_PATTERN,
    ORDERBOOK_DEPTHS,
    SERVICE_NAME_PATTERN,
    SYMBOL_PATTERN,
)

CACHE_TIMEOUT = 2.0
MAX_BOOK_DEPTH = 1000
MAX_SAMPLES = 1000


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
    if not (SYMBOL_PATTERN.fullmatch(symbol) or OPTION_SYMBOL_PATTERN.fullmatch(symbol)):
        raise exceptions.ValidationError({"symbol": ["not a Bybit symbol"]})


def with_age(value: dict[str, Any]) -> dict[str, Any]:
    now_ms = time.time() * 1000
    exchange_ts = value.get("exchange_ts")
    value["age_ms"] = round(now_ms - exchange_ts, 1) if exchange_ts else None
    value["cache_age_ms"] = round(now_ms - value["written_at"] * 1000, 1)
    return value


class OrderBookView(APIView):
    """The latest cached book of a subscribed topic (the deepest one cached), top `depth` levels."""

    @extend_schema(parameters=[OpenApiParameter("depth", int, description="levels per side to return")])
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

    def get(self, request: Request, category: str, symbol: str) -> Response:
        check_market(category, symbol)
        ticker = cached(ticker_key(settings.REDIS_KEY_PREFIX, category, symbol))
        if ticker is None:
            raise exceptions.NotFound(f"No cached ticker for {category} {symbol}: is a service subscribed to it?")
        return Response({"category": category, "symbol": symbol, **with_age(ticker)})


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


class QueueDetailView(APIView):
    """One queue: its latest figures and its recent samples, newest first."""

    @extend_schema(
        parameters=[OpenApiParameter("samples", int, description="how many recent samples (1-1000, default 60)")]
    )
    def get(self, request: Request, name: str) -> Response:
        parsed = parse_queue_name(name)
        if parsed is None or not SERVICE_NAME_PATTERN.fullmatch(parsed[0]):
            raise exceptions.ValidationError({"name": ["not a ws-gateway queue: ws-gateway.<service>.<class>"]})
        count = query_int(request, "samples", 60, 1, MAX_SAMPLES)
        rows = own_samples(request, QueueSample.objects.filter(queue=name)).order_by("-taken_at")[:count]
        samples = QueueSampleSerializer(rows, many=True).data
        if not samples:
            raise exceptions.NotFound(f"No samples for queue {name!r} of your service yet.")
        return Response({**samples[0], "samples": samples})
