"""Operators' admin: subscriptions (with cancel), API keys (issue with scopes, shown once; revoke)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from subscriptions import services
from subscriptions.models import ApiKey, Scope, Subscription, default_scopes


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = [
        "service_name",
        "channel",
        "category",
        "symbol",
        "bybit_topic",
        "status",
        "last_event_at",
        "created_at",
    ]
    list_filter = ["status", "channel", "category", "event_class", "service_name"]
    search_fields = ["service_name", "symbol", "bybit_topic", "routing_key", "id"]
    readonly_fields = [f.name for f in Subscription._meta.fields]
    actions = ["cancel_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # subscriptions are made through the API, which validates them

    @admin.action(description="Cancel selected subscriptions")
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        cancelled = 0
        for subscription in queryset.exclude(status=Subscription.Status.CANCELLED):
            services.subscription_cancel(subscription=subscription)
            cancelled += 1
        self.message_user(request, f"Cancelled {cancelled} subscription(s); the gateway was told.", messages.SUCCESS)


class ApiKeyForm(forms.ModelForm):
    scopes = forms.TypedMultipleChoiceField(
        choices=Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=default_scopes,
        required=False,
        help_text="None ticked issues the default: market data only.",
    )

    class Meta:
        model = ApiKey
        fields = ["service_name", "label", "scopes"]

    def clean_scopes(self) -> list[str]:
        return self.cleaned_data["scopes"] or default_scopes()


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["service_name", "prefix", "label", "scopes", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["service_name"]
    search_fields = ["service_name", "prefix", "label"]
    actions = ["revoke_selected"]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        return ["service_name", "prefix", "created_at", "last_used_at", "revoked_at"] if obj else []

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            # Scopes can change on a live key: granting or withdrawing account data needs no new key.
            obj.save(update_fields=["label", "scopes"])
            return
        key, raw = services.api_key_issue(service_name=obj.service_name, label=obj.label, scopes=obj.scopes)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = key.pk, key.prefix, key.key_hash, key.created_at
        self.message_user(
            request, f"New key for {key.service_name}: {raw} (copy it now: it is not shown again).", messages.WARNING
        )

    @admin.action(description="Revoke selected keys")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset.filter(revoked_at__isnull=True):
            services.api_key_revoke(api_key=key)
        self.message_user(request, "Revoked.", messages.SUCCESS)
