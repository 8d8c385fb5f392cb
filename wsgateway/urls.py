"""Top-level routes: index, API (the control plane's and the data plane's), schema and docs, admin, health, metrics."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from streaming import views as data
from streaming.monitoring.metrics import metrics_view
from wsgateway import health, views

# The admin's "View site" opens the API docs, the page an operator there most likely wants.
admin.site.site_url = "/api/docs/"

urlpatterns = [
    path("", views.index_view, name="index"),
    path("health", health.health_view, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("subscriptions.urls")),
    # The data plane's read API: market state, the account (orders, positions, balances), queues.
    path("api/v1/market/orderbook/<str:category>/<str:symbol>", data.OrderBookView.as_view(), name="market-orderbook"),
    path("api/v1/market/ticker/<str:category>/<str:symbol>", data.TickerView.as_view(), name="market-ticker"),
    path("api/v1/balances", data.BalanceListView.as_view(), name="balances"),
    path("api/v1/account/orders", data.AccountOrdersView.as_view(), name="account-orders"),
    path("api/v1/account/positions", data.AccountPositionsView.as_view(), name="account-positions"),
    path("api/v1/queues", data.QueueListView.as_view(), name="queues"),
    path("api/v1/queues/<str:name>", data.QueueDetailView.as_view(), name="queue-detail"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema", template_name="api/redoc.html"), name="redoc"),
    # Last: any other path under /api/ answers a JSON 404 (even with DEBUG on), never Django's HTML page.
    re_path(r"^api/(?P<rest>.*)$", views.api_not_found_view, name=views.API_NOT_FOUND),
]
