"""The subscriptions API: validate, call the service, serialize. Errors are JSON with a `code`."""

from __future__ import annotations

from typing import Any

import django_filters
import structlog
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db.models import QuerySet
from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status
from rest_framework.decorators import action
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.viewsets import GenericViewSet

from subscriptions import services, topics
from subscriptions.authentication import Caller, SubscribeScope
from subscriptions.models import Subscription
from subscriptions.queryparams import ChoiceFilter, pattern_filter
from subscriptions.serializers import CancelledCountSerializer, SubscriptionRequestSerializer, SubscriptionSerializer

log = structlog.get_logger(__name__)

CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "invalid_api_key",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.ValidationError: "invalid",
    exceptions.ParseError: "malformed_request",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "throttled",
}
# Codes raised by name rather than by exception class.
EXTRA_CODES = ("other_service", "request_too_large", "server_error", "missing_scope", "queue_in_use",
               "rabbitmq_unavailable")  # fmt: skip


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every API error as `{"code", "detail", "fields"?}`; unexpected errors as a 500 of that shape."""
    if isinstance(exc, RequestDataTooBig):
        detail = f"The body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
        return Response({"code": "request_too_large", "detail": detail}, status=413)
    if isinstance(exc, SuspiciousOperation):
        # Django's own limits on a request (DATA_UPLOAD_MAX_NUMBER_FIELDS, ...): a 400, as Django answers.
        return Response({"code": "malformed_request", "detail": str(exc)[:200]}, status=400)
    if isinstance(exc, RecursionError):
        # Only input nested past Python's recursion limit gets here (the JSON parser, or a serializer
        # turning such a value into a string): none of this code recurses on its own.
        return Response({"code": "malformed_request", "detail": "The body is nested too deeply."}, status=400)
    response = drf_exception_handler(exc, context)
    if response is None:
        log.exception("api.unhandled_error", error=type(exc).__name__)
        return Response({"code": "server_error", "detail": "Internal error."}, status=500)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    code = next((c for cls, c in CODES.items() if isinstance(exc, cls)), "error")
    if isinstance(exc, exceptions.ValidationError):
        fields = response.data if isinstance(response.data, dict) else {"non_field_errors": response.data}
        response.data = {"code": code, "detail": "Invalid input.", "fields": fields}
    else:
        detail = response.data.get("detail", "") if isinstance(response.data, dict) else response.data
        # A code given explicitly where the error is raised ("other_service") wins over the class's.
        codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else None
        if isinstance(codes, str) and codes != getattr(exc, "default_code", codes):
            code = codes
        response.data = {"code": code, "detail": str(detail)}
    return response


ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "detail"],
    "properties": {
        "code": {
            "type": "string",
            "description": "stable, for programs: " + ", ".join(sorted({*CODES.values(), *EXTRA_CODES})),
        },
        "detail": {"type": "string", "description": "for people"},
        "fields": {
            "type": "object",
            "description": "`invalid` only: each offending field or parameter, with the reasons",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
}
# Which errors each operation documents: always, with parameters or a body, with an {id}, with a body.
ERRORS_ALWAYS = {
    "401": "`not_authenticated` (no X-API-Key) or `invalid_api_key` (unknown or revoked)",
    "403": "`forbidden`, `other_service` (the key may not act for that service) or `missing_scope`",
    "429": "`throttled`: too many wrong keys from this address; retry after `Retry-After` seconds",
}
ERRORS_WITH_INPUT = {"400": "`invalid` (with `fields`: each offending field and why) or `malformed_request`"}
URI_TOO_LONG = "the request line is over the web server's limit (gunicorn: 4094 bytes); not JSON"
ERRORS_WITH_ID = {"404": "`not_found`: no such row, or not the calling service's"}
ERRORS_WITH_BODY = {
    "413": "`request_too_large`: the body is over DATA_UPLOAD_MAX_MEMORY_SIZE",
    "415": "`unsupported_media_type`: send Content-Type: application/json",
}


def document_errors(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: every operation lists the errors it can answer, in the shape above."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, operations in result.get("paths", {}).items():
        for operation in operations.values():
            errors = dict(ERRORS_ALWAYS)
            # A malformed id is simply not found; every other parameter is checked (400).
            checked = [p for p in operation.get("parameters", []) if p["name"] != "id"]
            if checked or "requestBody" in operation:
                errors.update(ERRORS_WITH_INPUT)
            if "{id}" in path:
                errors.update(ERRORS_WITH_ID)
            if "requestBody" in operation:
                errors.update(ERRORS_WITH_BODY)
            for status_code, description in errors.items():
                operation["responses"].setdefault(
                    status_code,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )
            # Answered by gunicorn before Django sees the request, so not in the JSON shape.
            operation["responses"].setdefault("414", {"description": URI_TOO_LONG})
    return result


class SubscriptionFilter(django_filters.FilterSet):
    service_name = pattern_filter(topics.SERVICE_NAME_PATTERN, "only this service's rows (the operator key sees all)")
    channel = ChoiceFilter(list(topics.CHANNELS))
    status = ChoiceFilter(Subscription.Status.values)
    symbol = pattern_filter(topics.ANY_SYMBOL_PATTERN, "exact symbol, e.g. BTCUSDT")
    category = ChoiceFilter(topics.CATEGORIES)

    class Meta:
        model = Subscription
        fields = ["service_name", "channel", "status", "symbol", "category"]


SERVICE_NAME_PARAMETER = OpenApiParameter(
    "service_name",
    {"type": "string", "pattern": topics.SERVICE_NAME_PATTERN.pattern, "maxLength": 63},
    OpenApiParameter.PATH,
    required=True,
    description="a service key may name only its own service",
)


@extend_schema_view(
    list=extend_schema(description="Subscriptions of the calling service (every service's for the operator key)."),
    retrieve=extend_schema(description="One subscription, cancelled ones included."),
)
class SubscriptionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GenericViewSet):
    """Subscriptions of the calling service (all services for the operator key)."""

    serializer_class = SubscriptionSerializer
    filterset_class = SubscriptionFilter
    permission_classes = [IsAuthenticated, SubscribeScope]

    def get_queryset(self) -> QuerySet[Subscription]:
        if getattr(self, "swagger_fake_view", False):
            # Schema generation: the schema is the same whoever asks for it, with or without a key.
            return Subscription.objects.none()
        caller: Caller = self.request.user  # type: ignore[assignment]
        rows = Subscription.objects.all()
        if not caller.is_operator:
            rows = rows.filter(service_name=caller.service_name)
        return rows

    def service_for(self, requested: str | None) -> str:
        caller: Caller = self.request.user  # type: ignore[assignment]
        if caller.is_operator:
            if not requested:
                raise exceptions.ValidationError({"service_name": ["Required when acting with the operator key."]})
            return requested
        if requested and requested != caller.service_name:
            raise exceptions.PermissionDenied(f"This key belongs to {caller.service_name!r}.", code="other_service")
        assert caller.service_name is not None
        return caller.service_name

    @extend_schema(
        request=SubscriptionRequestSerializer,
        responses={
            201: OpenApiResponse(SubscriptionSerializer, "Subscribed: the new row, status `pending`."),
            200: OpenApiResponse(SubscriptionSerializer, "The service's live subscription to that stream already."),
        },
    )
    def create(self, request: Request) -> Response:
        """Subscribe; 201 with the new row, or 200 with the live row that already exists."""
        data = SubscriptionRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        attrs = dict(data.validated_data)
        service_name = self.service_for(attrs.pop("service_name", None))
        subscription, created = services.subscription_create(service_name=service_name, **attrs)
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(SubscriptionSerializer(subscription).data, status=code)

    @extend_schema(
        request=None,
        responses={200: OpenApiResponse(SubscriptionSerializer, "The row, now `cancelled` (again, if it was).")},
    )
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        """Cancel; the row stays, with status `cancelled` and `cancelled_at`, and can still be read."""
        subscription = services.subscription_cancel(subscription=self.get_object())
        return Response(SubscriptionSerializer(subscription).data)

    @extend_schema(
        request=None,
        parameters=[SERVICE_NAME_PARAMETER],
        responses={200: OpenApiResponse(CancelledCountSerializer, "How many live subscriptions were cancelled.")},
    )
    @action(detail=False, methods=["delete"], url_path=r"by-service/(?P<service_name>[^/]+)")
    def cancel_by_service(self, request: Request, service_name: str) -> Response:
        """Cancel every subscription of a service; returns how many were cancelled."""
        if not topics.SERVICE_NAME_PATTERN.match(service_name):
            raise exceptions.ValidationError({"service_name": ["not a service name: 1-63 of a-z, 0-9, '-', '_'"]})
        service_name = self.service_for(service_name)
        count = services.subscriptions_cancel_for_service(service_name=service_name)
        return Response({"service_name": service_name, "cancelled": count})
