"""Project-level request handling: the index at `/`, the JSON 404 under /api/, JSON-only request bodies."""

from __future__ import annotations

from collections.abc import Sequence

from django.http import HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve, reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.request import Request

API_NOT_FOUND = "api-not-found"
MAX_PATH_SHOWN = 200  # a 404 never echoes a megabyte of path back


@require_safe
def index_view(request: HttpRequest) -> JsonResponse:
    """A JSON map of the service's pages and endpoints, so `/` is never a 404."""
    return JsonResponse(
        {
            "service": "ws-gateway",
            "docs": reverse("docs"),
            "redoc": reverse("redoc"),
            "schema": reverse("schema"),
            "subscriptions": reverse("subscription-list"),
            "queues": reverse("queues"),
            "balances": reverse("balances"),
            "market": "/api/v1/market/{orderbook,ticker}/{category}/{symbol}",
            "health": reverse("health"),
            "metrics": reverse("metrics"),
            "admin": reverse("admin:index"),
        }
    )


@csrf_exempt
def api_not_found_view(request: HttpRequest, rest: str = "") -> HttpResponse:
    """A 404 in the API's error shape, naming the endpoint the caller probably meant.

    A page missing its trailing slash (`/api/docs`) is redirected, as Django's APPEND_SLASH
    would; an endpoint called with one (`/api/v1/subscriptions/`) is not, because curl and
    most clients do not follow a redirect with a POST body: the 404 names the right path.
    """
    path = request.path
    if not path.endswith("/") and is_endpoint(path + "/") and request.method in ("GET", "HEAD"):
        return HttpResponsePermanentRedirect(request.get_full_path().replace(path, path + "/", 1))
    near = path.rstrip("/") if path.endswith("/") else path + "/"
    if is_endpoint(near):
        hint = f"Did you mean {near}?" + (" API endpoints have no trailing slash." if path.endswith("/") else "")
    else:
        hint = f"The endpoints are listed at {reverse('docs')}."
    shown = path if len(path) <= MAX_PATH_SHOWN else path[:MAX_PATH_SHOWN] + "..."
    return JsonResponse({"code": "not_found", "detail": f"No API endpoint at {shown}. {hint}"}, status=404)


def is_endpoint(path: str) -> bool:
    try:
        return resolve(path).url_name != API_NOT_FOUND
    except Resolver404:
        return False


class JsonBodyNegotiation(DefaultContentNegotiation):
    """Request bodies are JSON only; any other body is a 415 that says how to send it.

    Without this, `curl -d '{...}'` (a form, by curl's default) reached the form parser and the
    whole JSON text came back as one unknown field name.
    """

    def select_parser(self, request: Request, parsers: Sequence[BaseParser]) -> BaseParser:
        parser = super().select_parser(request, parsers)
        if parser is None:
            sent = request.content_type[:100] or "none"
            raise exceptions.UnsupportedMediaType(
                sent, detail=f"Request bodies are JSON: send Content-Type: application/json (this one was {sent!r})."
            )
        return parser
