"""/health tells operators what works, within 2 s, even when a dependency hangs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import redis
from django.test import Client

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def get_health() -> tuple[int, dict, float]:
    started = time.monotonic()
    response = Client().get("/health")
    return response.status_code, response.json(), time.monotonic() - started


def point(settings, dependency: str, port: int) -> None:
    if dependency == "database":
        default = {**settings.DATABASES["default"], "HOST": "127.0.0.1", "PORT": str(port)}
        settings.DATABASES = {**settings.DATABASES, "default": default}
    elif dependency == "rabbitmq":
        settings.RABBITMQ_URL = f"amqp://guest:guest@127.0.0.1:{port}//"
    else:
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"


def write_status(settings, age: float, **fields: object) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    record = {"updated_at": time.time() - age, "state": "running", "circuit": {"state": "closed"}, "counters": {},
              "balances": {"pending": 3, "written": 10, "last_error": "OperationalError: down"}, **fields}  # fmt: skip
    client.set(f"{settings.REDIS_KEY_PREFIX}gateway:status", orjson.dumps(record))
    client.close()


def test_all_up_with_a_fresh_gateway_record_is_ok(settings, redis_prefix: str) -> None:
    write_status(settings, age=0.1)
    code, body, _ = get_health()
    assert code == 200 and body["status"] == "ok"
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "database": "ok", "rabbitmq": "ok", "redis": "ok", "gateway": "ok"
    }  # fmt: skip
    assert body["active_subscriptions"] == 0
    assert body["checks"]["gateway"]["balances"]["pending"] == 3  # balance writes waiting on the database


def test_no_gateway_record_is_degraded_not_down(redis_prefix: str) -> None:
    code, body, _ = get_health()
    assert code == 200 and body["status"] == "degraded"
    assert body["checks"]["gateway"]["status"] == "unknown"


def test_an_old_gateway_record_is_stale(settings, redis_prefix: str) -> None:
    write_status(settings, age=settings.GATEWAY_STATUS_STALE_AFTER + 5)
    code, body, _ = get_health()
    assert (code, body["status"], body["checks"]["gateway"]["status"]) == (200, "degraded", "stale")


def test_bybit_refusing_the_api_key_makes_health_degraded_and_says_so(settings, redis_prefix: str) -> None:
    refused = {"name": "private-1", "category": "private", "state": "auth_failed", "auth_error": "API key is invalid.",
               "auth_failures": 7, "auth_failing_since": 1_800_000_000.0}  # fmt: skip
    endpoint = "wss://stream.bybit.com/v5/private"
    write_status(settings, age=0.1, sockets=[refused], circuits={endpoint: {"state": "closed"}})
    code, body, _ = get_health()
    assert (code, body["status"], body["checks"]["gateway"]["status"]) == (200, "degraded", "degraded")
    (problem,) = body["checks"]["gateway"]["problems"]
    assert "private-1" in problem and "API key is invalid." in problem and "7 refusals" in problem
    assert "2027-01-15T08:00:00Z" in problem
    assert body["checks"]["gateway"]["circuits"] == {endpoint: {"state": "closed"}}


@pytest.mark.parametrize("dependency", ["database", "rabbitmq", "redis"])
def test_an_unreachable_dependency_is_down_503(settings, redis_prefix: str, dependency: str) -> None:
    point(settings, dependency, closed_port())
    code, body, elapsed = get_health()
    assert code == 503 and body["status"] == "down"
    assert body["checks"][dependency]["status"] == "down"
    assert elapsed < 2.0


@pytest.mark.parametrize("dependency", ["database", "rabbitmq", "redis"])
def test_a_hanging_dependency_still_gets_an_answer_within_2s(
    settings, redis_prefix: str, silent_port: int, dependency: str
) -> None:
    point(settings, dependency, silent_port)
    code, body, elapsed = get_health()
    assert elapsed < 2.0, f"/health took {elapsed:.2f}s"
    assert code == 503 and body["checks"][dependency]["status"] == "down"


def test_health_never_shows_credentials(settings, redis_prefix: str) -> None:
    settings.RABBITMQ_URL = f"amqp://guest:topsecretpw@127.0.0.1:{closed_port()}//"
    _, body, _ = get_health()
    assert "topsecretpw" not in orjson.dumps(body).decode()
