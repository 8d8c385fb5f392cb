"""Top-level routes: API, schema and docs, admin, health, metrics."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from streaming.monitoring.metrics import metrics_view
from subscriptions.views import api_not_found
from wsgateway import health

urlpatterns = [
    path("health", health.health_view, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("subscriptions.urls")),
    path("api/v1/", include("streaming.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # Last: an /api/ path nothing above matched answers a JSON 404, not Django's HTML page.
    re_path(r"^api/", api_not_found),
]
