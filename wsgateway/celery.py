"""The Celery app: RabbitMQ broker, Redis results, settings under the CELERY_ namespace."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsgateway.settings")

app = Celery("wsgateway")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def use_django_logging(**_kwargs: Any) -> None:
    """Keep the structlog set-up Django already made, instead of Celery's own handlers."""
    from django.conf import settings

    from wsgateway.logging import configure_logging

    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
