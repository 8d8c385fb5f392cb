"""The Celery app: RabbitMQ broker, Redis results, settings under the CELERY_ namespace."""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsgateway.settings")

app = Celery("wsgateway")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_configure.connect
def stop_on_bad_configuration(**_kwargs: Any) -> None:
    """Load Django's settings before Celery reads them, so a bad value stops every celery command with one line.

    Celery loads its configuration lazily, from wherever it first needs it (an option's default,
    the worker's start-up, Flower's), so without this a missing DJANGO_SECRET_KEY is a 200-line
    traceback. manage.py prints the same line.
    """
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        settings.INSTALLED_APPS  # noqa: B018 - the first read imports wsgateway.settings
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        sys.exit(1)


@setup_logging.connect
def use_django_logging(**_kwargs: Any) -> None:
    """Keep the structlog set-up Django already made, instead of Celery's own handlers."""
    from django.conf import settings

    from wsgateway.logging import configure_logging

    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
