"""The subscriptions API: validate, call the service, serialize. Errors are JSON with a `code`."""

from __future__ import annotations

from typing import Any

import django_filters
import structlog
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.viewsets import GenericViewSet

from subscriptions import services, topics
from subscriptions.authentication import Caller
from subscriptions.models import Subscription
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


@csrf_exempt
def api_not_found(request: HttpRequest) -> HttpResponse:
    """A JSON 404 for every /api/ path no route took; GET of a path missing only its final slash redirects."""
    if request.method in ("GET", "HEAD") and not request.path_info.endswith("/"):
        # The catch-all route that leads here turns off CommonMiddleware's APPEND_SLASH for /api/.
        try:
            match = resolve(request.path_info + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not api_not_found:
            return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
    detail = "No API endpoint at this path; the endpoints are listed in /api/schema/ and /api/docs/."
    return JsonResponse({"code": "not_found", "detail": detail}, status=404)


class SubscriptionFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=Subscription.Status.choices)
    channel = django_filters.ChoiceFilter(choices=[(c, c) for c in topics.CHANNELS])
    category = django_filters.ChoiceFilter(choices=[(c, c) for c in topics.CATEGORIES])

    class Meta:
        model = Subscription
        fields = ["service_name", "channel", "status", "symbol", "category"]


class SubscriptionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GenericViewSet):
    """Subscriptions of the calling service (all services for the operator key)."""

    serializer_class = SubscriptionSerializer
    filterset_class = SubscriptionFilter

    def get_queryset(self) -> QuerySet[Subscription]:
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
        request=SubscriptionRequestSerializer, responses={200: SubscriptionSerializer, 201: SubscriptionSerializer}
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

    @extend_schema(request=None, responses=SubscriptionSerializer)
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        """Cancel; the row stays, with status `cancelled` and `cancelled_at`."""
        subscription = services.subscription_cancel(subscription=self.get_object())
        return Response(SubscriptionSerializer(subscription).data)

    @extend_schema(request=None, responses=CancelledCountSerializer)
    @action(detail=False, methods=["delete"], url_path=r"by-service/(?P<service_name>[^/]+)")
    def cancel_by_service(self, request: Request, service_name: str) -> Response:
        """Cancel every subscription of a service; returns how many were cancelled."""
        if not topics.SERVICE_NAME_PATTERN.fullmatch(service_name):
            raise exceptions.ValidationError({"service_name": ["not a service name: 1-63 of a-z, 0-9, '-', '_'"]})
        service_name = self.service_for(service_name)
        count = services.subscriptions_cancel_for_service(service_name=service_name)
        return Response({"service_name": service_name, "cancelled": count})
