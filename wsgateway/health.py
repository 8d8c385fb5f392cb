"""GET /health (placeholder until the health checks land)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse


def health_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "unknown"})
