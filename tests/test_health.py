"""/health tells operators what works, within 2 s, even when a dependency hangs."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import orjson
import pytest
import redis
from django.test import Client

from tests.conftest import management_api, wait_for

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


def health_connections(settings, rabbit: str) -> dict[str, set]:
    """The connections /health holds right now, as each server lists them."""
    from django.db import connection

    from wsgateway.health import CONNECTION_NAME

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
            [CONNECTION_NAME, settings.DATABASES["default"]["NAME"]],
        )
        database = {pid for (pid,) in cursor.fetchall()}
    client = redis.Redis.from_url(settings.REDIS_URL)
    cache = {c["id"] for c in client.client_list() if c["name"] == f"ws-gateway-health-{os.getpid()}"}
    client.close()
    vhost = quote(urlsplit(rabbit).path[1:], safe="")
    broker = {
        c["name"]
        for c in management_api(f"/vhosts/{vhost}/connections").json()
        if c.get("client_properties", {}).get("connection_name") == CONNECTION_NAME
    }
    return {"database": database, "redis": cache, "rabbitmq": broker}


def test_repeated_calls_reuse_the_same_connections(settings, rabbit: str, redis_prefix: str) -> None:
    write_status(settings, age=0.1)
    assert get_health()[0] == 200
    # The broker lists a new connection after a moment; the database and Redis at once.
    before = wait_for(
        lambda: (held := health_connections(settings, rabbit)) and all(held.values()) and held,
        message="the kept connections to show",
    )
    assert len(before["database"]) == len(before["rabbitmq"]) == 1, before
    for _ in range(20):
        assert get_health()[0] == 200
    after = health_connections(settings, rabbit)
    assert (after["database"], after["rabbitmq"]) == (before["database"], before["rabbitmq"])
    # Redis serves two checks of each call (ping, gateway record), which may overlap: at most two.
    assert len(after["redis"]) <= 2 and len(after["redis"] - before["redis"]) <= 1, (before, after)


def test_a_kept_connection_the_server_closed_is_replaced_without_a_false_alarm(settings, rabbit: str) -> None:
    assert get_health()[1]["checks"]["rabbitmq"]["status"] == "ok"
    wait_for(lambda: close_health_connections(rabbit), message="the broker to list the kept connection")
    assert get_health()[1]["checks"]["rabbitmq"]["status"] == "ok"


def close_health_connections(rabbit: str) -> int:
    """Close /health's AMQP connections from the broker's side, as a broker restart would."""
    from wsgateway.health import CONNECTION_NAME

    vhost = quote(urlsplit(rabbit).path[1:], safe="")
    closed = 0
    for conn in management_api(f"/vhosts/{vhost}/connections").json():
        if conn.get("client_properties", {}).get("connection_name") == CONNECTION_NAME:
            management_api(f"/connections/{quote(conn['name'], safe='')}", "DELETE", headers={"X-Reason": "test"})
            closed += 1
    return closed
