"""The Django project; loads the Celery app with Django."""

from __future__ import annotations

from wsgateway.celery import app as celery_app

__all__ = ["celery_app"]
