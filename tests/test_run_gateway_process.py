"""`manage.py run_gateway` as operators run it: SIGTERM drains, a standby takes over after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from django.conf import settings

from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import TIMEOUT_FACTOR, QueueReader, SimulatorThread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
LOCK_TTL = 1.5


@pytest.fixture
def fast_simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(rate=5.0, ping_timeout=30.0)  # orderbook.1 at 500 messages/s
    yield sim
    sim.close()


@pytest.fixture
def spawn(rabbit: str, redis_prefix: str, fast_simulator: SimulatorThread) -> Iterator:
    """Start `manage.py run_gateway` processes wired to the test database, vhost, prefix and simulator."""
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SECRET_KEY": "test-only",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "RABBITMQ_URL": rabbit,
        "REDIS_KEY_PREFIX": redis_prefix,
        "BYBIT_WS_URL": fast_simulator.url,
        "BYBIT_API_KEY": "",
        "BYBIT_API_SECRET": "",
        "GATEWAY_RECONCILE_INTERVAL": "0.3",
        "GATEWAY_LOCK_TTL": str(LOCK_TTL),
        "GATEWAY_STATUS_INTERVAL": "0.2",
        "GATEWAY_BACKOFF_BASE": "0.05",
        "LOG_FORMAT": "json",
    }
    processes: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        # Logs go to a file: a pipe nobody reads would block a chatty gateway.
        process = subprocess.Popen(
            [sys.executable, "manage.py", "run_gateway"],
            cwd=ROOT,
            env=env,
            stderr=tempfile.TemporaryFile(),  # noqa: SIM115
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def status(prefix: str) -> dict:
    client = redis.Redis.from_url(settings.REDIS_URL)
    raw = client.get(f"{prefix}gateway:status")
    client.close()
    return orjson.loads(raw) if raw else {}


def lock_holder(prefix: str) -> str:
    client = redis.Redis.from_url(settings.REDIS_URL)
    value = client.get(f"{prefix}gateway:lock")
    client.close()
    return value.decode() if value else ""


def subscribe_book() -> Subscription:
    book, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=1
    )
    wait_for(lambda: (book.refresh_from_db() or book.status) == "active", timeout=10, message="the book to go live")
    return book


def assert_contiguous(messages: list[dict]) -> set[int]:
    updates = {m["u"] for m in messages}
    assert updates == set(range(min(updates), max(updates) + 1)), "a gap in u: an event was lost"
    return updates


def test_sigterm_drains_every_event_and_exits_zero(spawn, rabbit: str, redis_prefix: str) -> None:
    gateway = spawn()
    subscribe_book()
    reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    reader.wait(lambda m: len(m) >= 300, message="the stream under way")
    gateway.send_signal(signal.SIGTERM)
    assert gateway.wait(10 * TIMEOUT_FACTOR) == 0
    final = status(redis_prefix)
    assert final["state"] == "stopped"
    counters = final["counters"]
    assert counters["events"] == counters["confirmed"] == counters["published"]
    reader.drain(1.0)
    updates = assert_contiguous(reader.messages)
    assert len(updates) == counters["events"]  # every event the gateway read is in the queue
    assert lock_holder(redis_prefix) == ""  # released for the next owner
    reader.close()


def test_standby_takes_over_after_the_owner_is_killed(spawn, rabbit: str, redis_prefix: str) -> None:
    owner = spawn()
    wait_for(lambda: f":{owner.pid}:" in lock_holder(redis_prefix), timeout=10, message="the first gateway to own")
    standby = spawn()
    subscribe_book()
    reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    reader.wait(lambda m: len(m) >= 100)
    assert f":{owner.pid}:" in lock_holder(redis_prefix)  # the standby waited
    owner.send_signal(signal.SIGKILL)
    owner.wait(5)
    wait_for(
        lambda: f":{standby.pid}:" in lock_holder(redis_prefix),
        timeout=LOCK_TTL * 2,
        message="the standby to take over within the lock TTL",
    )
    seen = len(reader.messages)
    reader.wait(lambda m: len(m) >= seen + 100, timeout=10, message="events flowing again from the new owner")
    assert status(redis_prefix)["state"] == "running"
    standby.send_signal(signal.SIGTERM)
    assert standby.wait(10 * TIMEOUT_FACTOR) == 0
    reader.close()
