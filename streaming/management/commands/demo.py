"""`make demo`: the whole service on this machine against the built-in Bybit simulator."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from typing import Any

import amqp
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from honcho.manager import Manager
from honcho.printer import Printer

from streaming.bybitrest import SIMULATOR_REST_PORT_OFFSET
from streaming.confirms import OVERFLOW_SUFFIX
from streaming.publisher import connect
from subscriptions.services import api_key_issue, subscription_create
from subscriptions.topics import EVENT_CLASSES, PRIVATE_CLASSES, queue_name

DEMO_SERVICE = "demo"
DEMO_BYBIT_KEY = "demo-simulator-key"  # accepted by the local simulator only
DEMO_SUBSCRIPTIONS = (
    {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"},
    {"channel": "orderbook", "category": "linear", "symbol": "BTCUSDT", "depth": 50},
    {"channel": "ticker", "category": "spot", "symbol": "ETHUSDT"},
    {"channel": "order"},
    {"channel": "position"},
    {"channel": "balance"},
)
# What the consumer prints: trades (about ten a second) and every private event (only on demand).
SHOWN_CLASSES = ("trade", *PRIVATE_CLASSES)


class Command(BaseCommand):
    help = (
        "Migrate, issue a demo key, subscribe, and run simulator, gateway, web, worker, beat and a consumer "
        "of the demo service's queues."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-tail", action="store_true", help="print private events only, not every trade")

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
        purged = purge_queues(settings.RABBITMQ_URL, DEMO_SERVICE)
        if purged:
            self.stderr.write(f"purged {purged} message(s) an earlier demo left in its queues")

        port, sim_port = settings.WS_GATEWAY_PORT, settings.SIMULATOR_PORT
        control_port = sim_port + SIMULATOR_REST_PORT_OFFSET
        bybit_secret = secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "DJANGO_DEBUG": "true",
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
            "BYBIT_ENVIRONMENT": "simulator",
            "BYBIT_WS_URL": f"ws://127.0.0.1:{sim_port}",
            "BYBIT_REST_URL": f"http://127.0.0.1:{control_port}",
            "BYBIT_API_KEY": DEMO_BYBIT_KEY,
            "BYBIT_API_SECRET": bybit_secret,
            "WS_GATEWAY_API_KEY": operator_key,
            "PYTHONUNBUFFERED": "1",
        }
        python = sys.executable
        self.stdout.write(
            banner(
                base=f"http://127.0.0.1:{port}",
                control=f"http://127.0.0.1:{control_port}",
                python=python,
                service_key=service_key,
                operator_key=operator_key,
                admin_password=admin_password,
                monitor_interval=settings.MONITOR_INTERVAL,
            )
        )
        shown = [c for c in SHOWN_CLASSES if not options["no_tail"] or c in PRIVATE_CLASSES]
        # Beat's schedule file lives as long as this run: a second demo (the tests run one) never shares it.
        workdir = tempfile.TemporaryDirectory(prefix="wsgateway-demo-")
        schedule = os.path.join(workdir.name, "beat-schedule")
        processes = {
            "simulator": f"{python} manage.py bybit_simulator --host 127.0.0.1 --port {sim_port} "
            f"--control-port {control_port} --api-key {DEMO_BYBIT_KEY} --api-secret {bybit_secret}",
            "gateway": f"{python} manage.py run_gateway",
            "web": f"{python} -m gunicorn wsgateway.wsgi --bind 127.0.0.1:{port} --workers 2 --access-logfile -",
            "worker": f"{python} -m celery -A wsgateway worker -l info --concurrency 2",
            "beat": f"{python} -m celery -A wsgateway beat -l info --schedule {schedule}",
            "consumer": f"{python} manage.py consume_events --service {DEMO_SERVICE} "
            + " ".join(f"--show {c}" for c in shown),
        }
        manager = Manager(Printer(sys.stdout))
        for name, cmd in processes.items():
            manager.add_process(name, cmd, env=env)
        manager.loop()
        workdir.cleanup()
        sys.exit(manager.returncode)


def banner(
    *,
    base: str,
    control: str,
    python: str,
    service_key: str,
    operator_key: str,
    admin_password: str,
    monitor_interval: float,
) -> str:
    """What `make demo` prints before its processes start: where things are, keys, commands to try."""
    key = f"-H 'X-API-Key: {service_key}'"
    return "\n".join(
        [
            "",
            "ws-gateway demo",
            f"  API        {base}/api/v1/subscriptions",
            f"  API docs   {base}/api/docs/   (Redoc: {base}/api/redoc/)",
            f"  admin      {base}/admin/   (user admin, password {admin_password})",
            f"  health     {base}/health",
            f"  queues     {base}/api/v1/queues   (monitored by beat every {monitor_interval:g} s)",
            f"  metrics    {base}/metrics",
            f"  service key for '{DEMO_SERVICE}':  {service_key}",
            f"  operator key:               {operator_key}",
            f"  The 'consumer' process reads the {DEMO_SERVICE} service's queues and acks every event, as a",
            "  service would; it prints trades and every private event (order, execution, position, balance).",
            f"  try:  curl {key} {base}/api/v1/subscriptions",
            f'  an order update:  curl -X POST {control}/control/orders -d \'{{"symbol": "BTCUSDT"}}\'',
            f"  a wallet update:  curl -X POST {control}/control/wallet -d '{{}}'",
            f"  then the balance:  curl {key} '{base}/api/v1/balances?account_type=UNIFIED'",
            f"  watch a class:  {python} manage.py tail_events --service {DEMO_SERVICE} --class orderbook",
            "  Ctrl-C stops everything.",
            "",
        ]
    )


def purge_queues(url: str, service: str) -> int:
    """Empty the service's queues (and overflow queues) an earlier run left; return how many messages went.

    Nothing consumed the demo's queues before this consumer existed, so a second `make demo`
    started with every queue full and its monitoring critical.
    """
    conn = connect(url, name="ws-gateway demo")
    purged = 0
    try:
        for event_class in EVENT_CLASSES:
            for queue in (queue_name(service, event_class), queue_name(service, event_class) + OVERFLOW_SUFFIX):
                channel = conn.channel()
                try:
                    purged += channel.queue_purge(queue) or 0
                except amqp.exceptions.NotFound:
                    continue  # no such queue; the error closed the channel
                channel.close()
    finally:
        conn.close()
    return purged
