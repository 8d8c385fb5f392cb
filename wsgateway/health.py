"""GET /health: a real round trip to each dependency, all within a hard deadline.

Policy: the database, RabbitMQ or Redis unreachable -> `down` (503); the gateway's status
record missing or stale, or a running gateway with a problem an operator must act on (Bybit
refusing the API key) -> `degraded` (200), because the API still works without it.

The round trips go over connections kept open between calls (one per concurrent check), so a
load balancer polling /health does not open three connections a call.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

import amqp
import orjson
import psycopg
import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET
from redis.backoff import NoBackoff
from redis.retry import Retry

from streaming.publisher import amqp_params
from subscriptions.models import Subscription
from wsgateway.logging import redact_value

# Hung checks keep their thread until their own socket timeout; a small pool bounds that.
POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
CONNECTION_NAME = "ws-gateway health"
# Idle connections kept per dependency; more are opened only while checks overlap.
KEEP_IDLE = 2
CHANNEL_ID = 1  # the AMQP channel each kept connection opens for its round trips
GATEWAY_PASSTHROUGH = (
    "state", "circuit", "sockets", "counters", "handoff_depth", "in_flight", "publisher", "books", "lvc", "balances",
    "malformed_by_reason", "read_pauses", "pacing", "circuits", "private",
    "epoch", "quarantined_by_reason", "quarantined_at", "recovery",
)  # fmt: skip


ConnT = TypeVar("ConnT")
ResultT = TypeVar("ResultT")


class IdleConnections(Generic[ConnT]):
    """Open connections to one dependency, reused across /health calls; thread-safe."""

    def __init__(self, connect: Callable[[], ConnT], close: Callable[[ConnT], None], keep: int = KEEP_IDLE) -> None:
        self.connect, self.close, self.keep = connect, close, keep
        self.idle: list[ConnT] = []
        self.lock = threading.Lock()

    def run(self, use: Callable[[ConnT], ResultT]) -> ResultT:
        """Call `use` on an idle connection, else a new one; a reused connection that fails is
        dropped and the call made once more on a new one (the server may have closed it)."""
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        if conn is not None:
            try:
                return self.finish(conn, use(conn))
            except Exception:  # noqa: BLE001 - a stale connection; a new one decides
                self.discard(conn)
        conn = self.connect()
        try:
            return self.finish(conn, use(conn))
        except BaseException:
            self.discard(conn)
            raise

    def finish(self, conn: ConnT, result: ResultT) -> ResultT:
        with self.lock:
            if len(self.idle) < self.keep:
                self.idle.append(conn)
                return result
        self.discard(conn)
        return result

    def close_idle(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            self.discard(conn)

    def discard(self, conn: ConnT) -> None:
        try:
            self.close(conn)
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too; it is gone either way
            pass


POOLS: dict[Hashable, IdleConnections[Any]] = {}
POOLS_LOCK = threading.Lock()


def idle_connections(key: Hashable, connect: Callable[[], Any], close: Callable[[Any], None]) -> IdleConnections[Any]:
    """The process's connections for `key` (what they connect to and how), made on first use."""
    with POOLS_LOCK:
        if key not in POOLS:
            POOLS[key] = IdleConnections(connect, close)
        return POOLS[key]


def close_idle_connections() -> None:
    """Close every connection /health keeps (before dropping a database they point at, as tests do)."""
    with POOLS_LOCK:
        pools = list(POOLS.values())
    for pool in pools:
        pool.close_idle()


def check_database(timeout: float) -> dict[str, Any]:
    db = settings.DATABASES["default"]
    params = {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "dbname": db["NAME"],
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "connect_timeout": max(1, round(timeout)),
        "options": f"-c statement_timeout={int(timeout * 1000)}",
        "application_name": CONNECTION_NAME,
        # Autocommit: an idle pooled connection must not sit inside a transaction.
        "autocommit": True,
    }
    pool = idle_connections(
        ("database", *sorted(params.items())), lambda: psycopg.connect(**params), psycopg.Connection.close
    )
    table = Subscription._meta.db_table

    def count_active(conn: psycopg.Connection) -> int:
        (count,) = conn.execute(f"SELECT count(*) FROM {table} WHERE status = %s", ["active"]).fetchone()
        return count

    return {"active_subscriptions": pool.run(count_active)}


def check_rabbitmq(timeout: float) -> dict[str, Any]:
    def connect() -> amqp.Connection:
        conn = amqp.Connection(
            **amqp_params(settings.RABBITMQ_URL),
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
            client_properties={"connection_name": CONNECTION_NAME},
        )
        try:
            conn.connect()
            conn.channel(CHANNEL_ID)
        except BaseException:
            conn.collect()
            raise
        return conn

    def round_trip(conn: amqp.Connection) -> None:
        # A passive declare of an exchange every vhost has: one request and its reply.
        conn.channels[CHANNEL_ID].exchange_declare("amq.direct", "direct", passive=True)

    idle_connections(("rabbitmq", settings.RABBITMQ_URL, timeout), connect, amqp.Connection.collect).run(round_trip)
    return {}


def redis_client(timeout: float) -> redis.Redis:
    """A client of its own (the monitor's tasks); close it after use."""
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout)


@functools.cache
def pooled_redis(url: str, timeout: float) -> redis.Redis:
    """/health's client: pooled, one per URL and timeout; one retry covers a connection Redis closed."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        client_name=f"ws-gateway-health-{os.getpid()}",
    )


def read_gateway_status(client: redis.Redis) -> dict[str, Any] | None:
    """The record run_gateway writes every GATEWAY_STATUS_INTERVAL; None when there is none."""
    raw = client.get(f"{settings.REDIS_KEY_PREFIX}gateway:status")
    return orjson.loads(raw) if raw else None


def check_redis(timeout: float) -> dict[str, Any]:
    pooled_redis(settings.REDIS_URL, timeout).ping()
    return {}


def gateway_problems(record: dict[str, Any]) -> list[str]:
    """What a running gateway's status record says an operator must act on, in words; empty when nothing."""
    problems = []
    for sock in record.get("sockets") or []:
        if sock.get("auth_error"):
            since = sock.get("auth_failing_since")
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else "?"
            problems.append(
                f"socket {sock.get('name')}: Bybit refuses the API key ({sock['auth_error']}), "
                f"{sock.get('auth_failures', '?')} refusals, failing since {when}; no private events arrive"
            )
    recovery = record.get("recovery") or {}
    if recovery.get("last_error"):
        since = recovery.get("failing_since")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else "?"
        problems.append(
            f"back-fill from Bybit's REST API failing since {when} ({recovery['last_error']}): "
            "private events missed in a gap are not repaired until it works"
        )
    return problems


def check_gateway(timeout: float) -> dict[str, Any]:
    record = read_gateway_status(pooled_redis(settings.REDIS_URL, timeout))
    if record is None:
        return {"status": "unknown", "detail": "no status record: is run_gateway running?"}
    age = time.time() - float(record.get("updated_at", 0))
    result = {k: record[k] for k in GATEWAY_PASSTHROUGH if k in record}
    result["age_s"] = round(age, 3)
    if record.get("state") in ("stopped", "standby"):
        return {"status": "unknown", **result}
    if age > settings.GATEWAY_STATUS_STALE_AFTER:
        return {"status": "stale", **result}
    problems = gateway_problems(record)
    if problems:
        return {"status": "degraded", "problems": problems, **result}
    return {"status": "ok", **result}


CHECKS: dict[str, Callable[[float], dict[str, Any]]] = {
    "database": check_database,
    "rabbitmq": check_rabbitmq,
    "redis": check_redis,
    "gateway": check_gateway,
}


def timed(check: Callable[[float], dict[str, Any]], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = check(timeout)
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency is reported, not raised
        reason = redact_value(f"{type(exc).__name__}: {exc}")[:200]
        return {"status": "down", "error": reason, "latency_ms": round((time.monotonic() - started) * 1000, 1)}
    result.setdefault("status", "ok")
    result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    return result


def run_checks(timeout: float) -> dict[str, dict[str, Any]]:
    futures = {name: POOL.submit(timed, check, timeout) for name, check in CHECKS.items()}
    wait(futures.values(), timeout=timeout + 0.2)
    results = {}
    for name, future in futures.items():
        if future.done():
            results[name] = future.result()
        else:
            future.cancel()
            results[name] = {"status": "down", "error": f"no answer within {timeout}s"}
    if results["gateway"]["status"] == "down":
        results["gateway"] = {**results["gateway"], "status": "unknown"}
    return results


@require_GET
def health_view(request: HttpRequest) -> JsonResponse:
    checks = run_checks(settings.HEALTH_CHECK_TIMEOUT)
    if any(checks[name]["status"] != "ok" for name in ("database", "rabbitmq", "redis")):
        overall = "down"
    elif checks["gateway"]["status"] != "ok":
        overall = "degraded"
    else:
        overall = "ok"
    body = {
        "status": overall,
        "checks": checks,
        "active_subscriptions": checks["database"].pop("active_subscriptions", None),
    }
    return JsonResponse(body, status=503 if overall == "down" else 200)
