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


def wait_for(
    condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.02, message: str = ""
) -> object:
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


def close_publisher_connections(url: str) -> int:
    """Close the gateway publisher's AMQP connections through the management API; return how many."""
    from streaming.publisher import PUBLISHER_CONNECTION_NAME

    vhost = urlsplit(url).path[1:]
    closed = 0
    for conn in management_api(f"/vhosts/{vhost}/connections").json():
        if conn.get("client_properties", {}).get("connection_name") == PUBLISHER_CONNECTION_NAME:
            path = f"/connections/{quote(conn['name'], safe='')}"
            # The API can still list a connection that is gone (an earlier test's): only a close that
            # took counts, so callers wait until the live publisher's connection is listed and cut.
            if management_api(path, "DELETE", headers={"X-Reason": "test"}).status_code == 204:
                closed += 1
    return closed


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's, plus: /health's kept connections are closed before the test database is dropped."""
    yield
    from wsgateway.health import close_idle_connections

    close_idle_connections()


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
def rabbit(rabbit_vhost: str, settings) -> Iterator[str]:
    """Point the project at the test vhost for this test; returns the AMQP URL. Its queues go after."""
    settings.RABBITMQ_URL = rabbit_vhost
    settings.CELERY_BROKER_URL = rabbit_vhost
    yield rabbit_vhost
    vhost = urlsplit(rabbit_vhost).path[1:]
    for queue in management_api(f"/queues/{vhost}").json():
        management_api(f"/queues/{vhost}/{quote(queue['name'], safe='')}", "DELETE")


@pytest.fixture
def redis_prefix(settings) -> Iterator[str]:
    """A Redis key prefix of this test; its keys are deleted afterwards."""
    prefix = f"wsgateway-test:{uuid.uuid4().hex[:8]}:"
    url = settings.REDIS_URL  # a test may point the project elsewhere; clean up the real one
    settings.REDIS_KEY_PREFIX = prefix
    yield prefix
    client = redis.Redis.from_url(url)
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

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the simulator's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * TIMEOUT_FACTOR)

    def __getattr__(self, name: str):
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


class GatewayThread:
    """A real Gateway (settings as the test set them) running in its own thread and loop."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from streaming.gateway import Gateway, GatewayConfig

        self.gateway = Gateway(GatewayConfig.from_settings())
        self.result: int | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", asyncio.run(self.gateway.run())))
        self.thread.start()
        wait_for(lambda: self.gateway.state == "running", message="the gateway to start")

    def stop(self, timeout: float = 15.0) -> int | None:
        loop = self.gateway.loop
        if loop is not None and self.thread.is_alive():
            loop.call_soon_threadsafe(self.gateway.stop_event.set)
        self.thread.join(timeout * TIMEOUT_FACTOR)
        return self.result


@pytest.fixture
def gateway_settings(settings, rabbit: str, redis_prefix: str, simulator, simulator_credentials):
    """Point the gateway at the simulator, the test vhost and prefix, with test-sized timings."""
    settings.BYBIT_WS_URL = simulator.url
    settings.BYBIT_API_KEY, settings.BYBIT_API_SECRET = simulator_credentials
    settings.GATEWAY_PING_INTERVAL = 0.5
    settings.GATEWAY_DEAD_AFTER = 3.0
    settings.GATEWAY_CONNECT_TIMEOUT = 3.0
    settings.GATEWAY_BACKOFF_BASE = 0.05
    settings.GATEWAY_BACKOFF_CAP = 0.5
    settings.GATEWAY_HEALTHY_AFTER = 2.0
    settings.GATEWAY_CIRCUIT_FAILURES = 50
    settings.GATEWAY_CIRCUIT_WINDOW = 10.0
    settings.GATEWAY_CIRCUIT_COOLDOWN = 1.0
    settings.GATEWAY_RECONCILE_INTERVAL = 0.5
    settings.GATEWAY_LOCK_TTL = 2.0
    settings.GATEWAY_STATUS_INTERVAL = 0.2
    return settings


@pytest.fixture
def start_gateway(gateway_settings):
    """Start gateways on demand; each is stopped (and checked to exit) after the test."""
    started: list[GatewayThread] = []

    def start() -> GatewayThread:
        runner = GatewayThread()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()


class QueueReader:
    """Consumes one queue into `messages` (decoded envelopes) on its own connection."""

    def __init__(self, url: str, queue: str) -> None:
        import orjson

        from streaming.publisher import connect

        self.conn = connect(url, name="test reader")
        self.channel = self.conn.channel()
        self.messages: list[dict] = []
        self.raw: list = []

        def on_message(message) -> None:
            self.raw.append(message)
            self.messages.append(orjson.loads(message.body))

        self.channel.basic_consume(queue, callback=on_message, no_ack=True)

    def drain(self, budget: float = 0.2) -> int:
        """Take what has arrived, for at most `budget` seconds; return the count so far."""
        deadline = time.monotonic() + budget
        try:
            while time.monotonic() < deadline:
                self.conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass
        return len(self.messages)

    def wait(self, condition, timeout: float = 10.0, message: str = "") -> None:
        wait_for(lambda: self.drain() >= 0 and condition(self.messages), timeout, interval=0, message=message)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def service_key(db) -> str:
    """The raw API key of service "alpha", with market and account scopes."""
    from subscriptions.services import api_key_issue

    return api_key_issue(service_name="alpha", scopes=["market", "account"])[1]


@pytest.fixture
def other_key(db) -> str:
    """The raw API key of service "bravo", who must not see alpha's rows."""
    from subscriptions.services import api_key_issue

    return api_key_issue(service_name="bravo")[1]


@pytest.fixture
def api_client(service_key: str):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_X_API_KEY=service_key)
    return client


OPERATOR_KEY = "wsg_operator_test_key_0123456789abcdef"


@pytest.fixture
def operator_client(db, settings):
    from rest_framework.test import APIClient

    settings.WS_GATEWAY_API_KEY = OPERATOR_KEY
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=OPERATOR_KEY)
    return client
