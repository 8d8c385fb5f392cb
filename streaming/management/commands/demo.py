"""`make demo`: the whole service on this machine against the built-in Bybit simulator."""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from honcho.manager import Manager
from honcho.printer import Printer

from subscriptions.services import api_key_issue, subscription_create

DEMO_SERVICE = "demo"
DEMO_BYBIT_KEY = "demo-simulator-key"  # accepted by the local simulator only
DEMO_SUBSCRIPTIONS = (
    {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"},
    {"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT", "depth": 50},
    {"channel": "ticker", "category": "spot", "symbol": "ETHUSDT"},
    {"channel": "order"},
)


class Command(BaseCommand):
    help = "Migrate, issue a demo key, subscribe, and run simulator, gateway, web, worker and beat."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-tail", action="store_true", help="do not print the demo service's trades")

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        # Both scopes: the demo subscribes to orders and the tour reads balances with this key.
        _, service_key = api_key_issue(service_name=DEMO_SERVICE, label="make demo", scopes=["market", "account"])
        operator_key = settings.WS_GATEWAY_API_KEY or "wsg_operator_" + secrets.token_urlsafe(24)
        admin_password = secrets.token_urlsafe(12)
        admin, _ = get_user_model().objects.get_or_create(username="admin", defaults={"is_staff": True})
        admin.is_staff = admin.is_superuser = True
        admin.set_password(admin_password)
        admin.save()
        for spec in DEMO_SUBSCRIPTIONS:
            subscription_create(
                service_name=DEMO_SERVICE,
                channel=spec["channel"],
                category=spec.get("category", ""),
                symbol=spec.get("symbol", ""),
                depth=spec.get("depth"),
                interval="",
            )

        port, sim_port = settings.WS_GATEWAY_PORT, settings.SIMULATOR_PORT
        bybit_secret = secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "DJANGO_DEBUG": "true",
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
            "BYBIT_ENVIRONMENT": "simulator",
            "BYBIT_WS_URL": f"ws://127.0.0.1:{sim_port}",
            "BYBIT_API_KEY": DEMO_BYBIT_KEY,
            "BYBIT_API_SECRET": bybit_secret,
            "WS_GATEWAY_API_KEY": operator_key,
            "PYTHONUNBUFFERED": "1",
        }
        python, base = sys.executable, f"http://127.0.0.1:{port}"
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "ws-gateway demo",
                    f"  API        {base}/api/v1/subscriptions",
                    f"  API docs   {base}/api/docs/",
                    f"  admin      {base}/admin/   (user admin, password {admin_password})",
                    f"  health     {base}/health",
                    f"  queues     {base}/api/v1/queues   (monitored by beat every {settings.MONITOR_INTERVAL:g} s)",
                    f"  metrics    {base}/metrics",
                    f"  service key for '{DEMO_SERVICE}':  {service_key}",
                    f"  operator key:               {operator_key}",
                    f"  try:  curl -H 'X-API-Key: {service_key}' {base}/api/v1/subscriptions",
                    f"  an order update:  curl -X POST http://127.0.0.1:{sim_port}/control/orders "
                    '-d \'{"symbol": "BTCUSDT"}\'',
                    f"  watch a class:  {python} manage.py tail_events --service {DEMO_SERVICE} --class order",
                    "  Ctrl-C stops everything.",
                    "",
                ]
            )
        )
        manager = Manager(Printer(sys.stdout))
        processes = {
            "simulator": f"{python} manage.py bybit_simulator --host 127.0.0.1 --port {sim_port} "
            f"--api-key {DEMO_BYBIT_KEY} --api-secret {bybit_secret}",
            "gateway": f"{python} manage.py run_gateway",
            "web": f"{python} -m gunicorn wsgateway.wsgi --bind 127.0.0.1:{port} --workers 2 --access-logfile -",
            "worker": f"{python} -m celery -A wsgateway worker -l info --concurrency 2",
            "beat": f"{python} -m celery -A wsgateway beat -l info --schedule /tmp/wsgateway-demo-beat",
        }
        if not options["no_tail"]:
            processes["trades"] = f"{python} manage.py tail_events --service {DEMO_SERVICE} --class trade"
        for name, cmd in processes.items():
            manager.add_process(name, cmd, env=env)
        manager.loop()
        sys.exit(manager.returncode)
