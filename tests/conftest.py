"""Shared fixtures: real PostgreSQL (pytest-django), an own RabbitMQ vhost, an own Redis prefix."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import redis
import requests
from django.conf import settings

TIMEOUT_FACTOR = float(os.environ.get("WSGATEWAY_TESTS_TIMEOUT_FACTOR", "1"))


def wait_for(condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.02, message: str = "") -> object:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout * TIMEOUT_FACTOR:.1f}s waiting for {message or condition}")
        time.sleep(interval)


def management_api(path: str, method: str = "GET", **kwargs: object) -> requests.Response:
    base = settings.RABBITMQ_MANAGEMENT_URL.rstrip("/")
    return requests.request(method, f"{base}/api{path}", auth=("guest", "guest"), timeout=10, **kwargs)


@pytest.fixture(scope="session")
def rabbit_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test session, deleted at the end; returns its AMQP URL."""
    name = f"wsgateway-test-{uuid.uuid4().hex[:8]}"
    management_api(f"/vhosts/{quote(name, safe='')}", "PUT").raise_for_status()
    management_api(
        f"/permissions/{quote(name, safe='')}/guest", "PUT", json={"configure": ".*", "write": ".*", "read": ".*"}
    ).raise_for_status()
    parts = urlsplit(settings.RABBITMQ_URL)
    url = urlunsplit((parts.scheme, parts.netloc, "/" + quote(name, safe=""), "", ""))
    yield url
    management_api(f"/vhosts/{quote(name, safe='')}", "DELETE")


@pytest.fixture
def rabbit(rabbit_vhost: str, settings) -> str:  # noqa: ANN001 - pytest-django's settings fixture
    """Point the project at the test vhost for this test; returns the AMQP URL."""
    settings.RABBITMQ_URL = rabbit_vhost
    settings.CELERY_BROKER_URL = rabbit_vhost
    return rabbit_vhost


@pytest.fixture
def redis_prefix(settings) -> Iterator[str]:  # noqa: ANN001
    """A Redis key prefix of this test; its keys are deleted afterwards."""
    prefix = f"wsgateway-test:{uuid.uuid4().hex[:8]}:"
    settings.REDIS_KEY_PREFIX = prefix
    yield prefix
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class SimulatorThread:
    """A real Simulator on port 0, running in its own thread and event loop, for sync tests."""

    def __init__(self, **kwargs: object) -> None:
        import asyncio
        import threading

        from streaming.simulator import Simulator

        self.loop = asyncio.new_event_loop()
        self.sim = Simulator(**kwargs)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.loop.run_forever, name="simulator", daemon=True)
        self.thread.start()
        self.call(self.sim.start())

    def call(self, coro, timeout: float = 10.0):  # noqa: ANN001, ANN201 - any coroutine of the simulator
        """Run a coroutine on the simulator's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * TIMEOUT_FACTOR)

    def __getattr__(self, name: str):  # noqa: ANN204 - stats(), sent, url... read straight from the simulator
        return getattr(self.sim, name)

    def close(self) -> None:
        self.call(self.sim.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


SIMULATOR_CREDENTIALS = ("sim-test-key", "sim-test-secret-do-not-use")


@pytest.fixture
def simulator_credentials() -> tuple[str, str]:
    return SIMULATOR_CREDENTIALS


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    """A running simulator with short heartbeat timeouts and the test credentials."""
    sim = SimulatorThread(credentials=dict([SIMULATOR_CREDENTIALS]), ping_timeout=30.0)
    yield sim
    sim.close()
