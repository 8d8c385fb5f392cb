"""Data-plane API routes: market state, the account (orders, positions, balances), queues."""

from __future__ import annotations

from django.urls import path

from streaming import views

urlpatterns = [
    path("market/orderbook/<str:category>/<str:symbol>", views.OrderBookView.as_view(), name="market-orderbook"),
    path("market/ticker/<str:category>/<str:symbol>", views.TickerView.as_view(), name="market-ticker"),
    path("balances", views.BalanceListView.as_view(), name="balances"),
    path("account/orders", views.AccountOrdersView.as_view(), name="account-orders"),
    path("account/positions", views.AccountPositionsView.as_view(), name="account-positions"),
    path("queues", views.QueueListView.as_view(), name="queues"),
    path("queues/<str:name>", views.QueueDetailView.as_view(), name="queue-detail"),
]
