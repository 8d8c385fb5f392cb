"""`manage.py run_gateway`: a thin shell over streaming.gateway.main."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop
from django.conf import settings
from django.core.management.base import BaseCommand

from streaming import gateway


class Command(BaseCommand):
    help = "Own the Bybit sockets and publish every event to RabbitMQ."

    def handle(self, *args: Any, **options: Any) -> None:
        code = uvloop.run(gateway.main()) if settings.GATEWAY_UVLOOP else asyncio.run(gateway.main())
        sys.exit(code)
