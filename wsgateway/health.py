"""GET /health: a real round trip to each dependency, all within a hard deadline.

Policy: the database, RabbitMQ or Redis unreachable -> `down` (503); the gateway's status
record missing or stale, or a running gateway with a problem an operator must act on (Bybit
refusing the API key) -> `degraded` (200), because the API still works without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import amqp
import orjson
import psycopg
import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from streaming.publisher import amqp_params
from subscriptions.models import Subscription
from wsgateway.logging import redact_value

# Hung checks keep their thread until their own socket timeout; a small pool bounds that.
POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
GATEWAY_PASSTHROUGH = (
    "state", "circuit", "sockets", "counters", "handoff_depth", "in_flight", "publisher", "books", "lvc", "balances",
    "malformed_by_reason", "read_pauses", "circuits", "private",
    "epoch", "quarantined_by_reason", "quarantined_at",
)  # fmt: skip


def check_database(timeout: float) -> dict[str, Any]:
    db = settings.DATABASES["default"]
    with psycopg.connect(
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        dbname=db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        connect_timeout=max(1, round(timeout)),
        options=f"-c statement_timeout={int(timeout * 1000)}",
    ) as conn:
        conn.execute("SELECT 1")
        table = Subscription._meta.db_table
        (count,) = conn.execute(f"SELECT count(*) FROM {table} WHERE status = %s", ["active"]).fetchone()
    return {"active_subscriptions": count}


def check_rabbitmq(timeout: float) -> dict[str, Any]:
    conn = amqp.Connection(
        **amqp_params(settings.RABBITMQ_URL), connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout
    )
    try:
        conn.connect()
    finally:
        conn.collect()
    return {}


def redis_client(timeout: float) -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout)


def read_gateway_status(client: redis.Redis) -> dict[str, Any] | None:
    """The record run_gateway writes every GATEWAY_STATUS_INTERVAL; None when there is none."""
    raw = client.get(f"{settings.REDIS_KEY_PREFIX}gateway:status")
    return orjson.loads(raw) if raw else None


def check_redis(timeout: float) -> dict[str, Any]:
    client = redis_client(timeout)
    try:
        client.ping()
    finally:
        client.close()
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
    return problems


def check_gateway(timeout: float) -> dict[str, Any]:
    client = redis_client(timeout)
    try:
        record = read_gateway_status(client)
    finally:
        client.close()
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
