"""Query parameters read strictly (numbers, filters, limit/offset): a bad value is a 400 naming it, never replaced."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import django_filters
from django import forms
from django.core.validators import RegexValidator
from django_filters import fields as filter_fields
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, pagination
from rest_framework.request import Request

MAX_LIMIT = 1000
# PostgreSQL's OFFSET is a bigint; a smaller bound keeps offset + limit far from it.
MAX_OFFSET = 2**31 - 1


def query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    """The query parameter `name` as an int in [minimum, maximum], `default` when absent; else a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # str.isdigit() alone accepts superscripts and other Unicode digits that int() refuses; the
    # length bound keeps int() off megabyte-long strings.
    if raw.isascii() and raw.isdigit() and len(raw) <= 20 and minimum <= int(raw) <= maximum:
        return int(raw)
    raise exceptions.ValidationError({name: [f"a whole number from {minimum} to {maximum}"]})


class NonEmpty:
    """For filter fields: a parameter given needs a value (`?status=` is a 400, not read as "any")."""

    def clean(self, value: Any) -> Any:
        if value == "":
            raise forms.ValidationError("give a value, or leave the parameter out")
        return super().clean(value)  # type: ignore[misc]


class NonEmptyChoiceField(NonEmpty, filter_fields.ChoiceField):
    pass


class NonEmptyCharField(NonEmpty, forms.CharField):
    pass


class ChoiceFilter(django_filters.ChoiceFilter):
    """An exact-match filter on one of a few values, documented as an enum."""

    field_class = NonEmptyChoiceField

    def __init__(self, choices: Sequence[str], description: str = "") -> None:
        super().__init__(choices=[(c, c) for c in choices], help_text=description)


class PatternFilter(django_filters.CharFilter):
    field_class = NonEmptyCharField


def pattern_filter(pattern: re.Pattern[str], description: str) -> PatternFilter:
    """An exact-match filter whose value must match `pattern` (a 400 otherwise), documented with it."""
    schema = {"type": "string", "pattern": pattern.pattern, "description": description}
    return extend_schema_field(schema)(PatternFilter(validators=[RegexValidator(pattern)], help_text=description))


class Pagination(pagination.LimitOffsetPagination):
    """`?limit=` (1-1000) and `?offset=`; a value out of range is a 400, never silently replaced."""

    max_limit = MAX_LIMIT

    def get_limit(self, request: Request) -> int:
        return query_int(request, self.limit_query_param, self.default_limit, 1, self.max_limit)

    def get_offset(self, request: Request) -> int:
        return query_int(request, self.offset_query_param, 0, 0, MAX_OFFSET)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        bounds = {
            self.limit_query_param: {"minimum": 1, "maximum": self.max_limit, "default": self.default_limit},
            self.offset_query_param: {"minimum": 0, "maximum": MAX_OFFSET, "default": 0},
        }
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"].update(bounds[parameter["name"]])
        return parameters
