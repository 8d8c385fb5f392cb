"""Alert state in one Redis hash: each alert fires once when crossed and once more when cleared, never every tick.

A crossing is a structured log event named after the alert (`queue.backlog.critical`, ...) and,
when ALERT_WEBHOOK_URL is set, one JSON POST. `run_alone` keeps two runs of one check apart.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis
import structlog
from django.conf import settings

from streaming.monitoring.checks import Alert
from wsgateway.health import redis_client

log = structlog.get_logger(__name__)


def alerts_key() -> str:
    return f"{settings.REDIS_KEY_PREFIX}monitor:alerts"


def active_alerts(client: redis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(v) for v in client.hgetall(alerts_key()).values()]


def sync_alerts(
    client: redis.Redis, families: Iterable[str], alerts: list[Alert], context: dict[str, dict] | None = None
) -> list[dict[str, Any]]:
    """Store the alerts now true for `families`; return the crossings (fired, escalated, resolved).

    `context` maps a subject to its current figures, reported with its resolved events.
    """
    families = set(families)
    stored = {k.decode(): orjson.loads(v) for k, v in client.hgetall(alerts_key()).items()}
    now = time.time()
    events: list[dict[str, Any]] = []
    current = {a.key: a for a in alerts}
    updates: dict[str, bytes] = {}
    for key, alert in current.items():
        before = stored.get(key)
        if before and before["alert"] == alert.name:
            continue
        record = {
            "alert": alert.name,
            "state": "firing",
            "severity": alert.severity,
            "subject": alert.subject,
            "since": now,
            "details": alert.details,
        }
        updates[key] = orjson.dumps(record)
        events.append({**record, "previous": before["alert"] if before else None})
    gone = [key for key in stored if key.split("|", 1)[0] in families and key not in current]
    for key in gone:
        before = stored[key]
        events.append(
            {
                "alert": before["alert"],
                "state": "resolved",
                "severity": before["severity"],
                "subject": before["subject"],
                "since": before["since"],
                "details": (context or {}).get(before["subject"], {}),
            }
        )
    pipe = client.pipeline()
    if updates:
        pipe.hset(alerts_key(), mapping=updates)
    if gone:
        pipe.hdel(alerts_key(), *gone)
    pipe.execute()
    return events


def crossings(events: list[dict[str, Any]]) -> list[str]:
    """`alert:state` of each event: what a task returns, for Flower and the tests."""
    return [f"{e['alert']}:{e['state']}" for e in events]


def emit(events: list[dict[str, Any]]) -> None:
    """Each crossing as a log event named after the alert, then (if configured) one POST each."""
    for event in events:
        level = "info" if event["state"] == "resolved" else "error" if event["severity"] == "critical" else "warning"
        fields = {k: v for k, v in event.items() if k != "alert"}
        getattr(log, level)(event["alert"], **fields)
    if settings.ALERT_WEBHOOK_URL and events:
        post_webhook(settings.ALERT_WEBHOOK_URL, events)


def post_webhook(url: str, events: list[dict[str, Any]]) -> int:
    """One POST per event, one try each; the first failure skips the rest of this run. Returns how many went."""
    sent = 0
    for event in events:
        request = urllib.request.Request(
            url, data=orjson.dumps(event), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.ALERT_WEBHOOK_TIMEOUT):
                sent += 1
        except (OSError, urllib.error.HTTPError) as exc:
            # The URL may carry a token: name only its host.
            log.warning(
                "alert.webhook_failed",
                host=urlsplit(url).hostname,
                error=type(exc).__name__ + (f" {exc.code}" if isinstance(exc, urllib.error.HTTPError) else ""),
                undelivered=len(events) - sent,
            )
            break
    return sent


def run_alone(name: str, check: Callable[[redis.Redis], dict[str, Any]]) -> dict[str, Any]:
    """Run a check with a Redis client, at most one at a time even when a worker is slow and beat keeps ticking."""
    client = redis_client(5.0)
    lock = f"{settings.REDIS_KEY_PREFIX}monitor:lock:{name}"
    try:
        if not client.set(lock, "1", nx=True, ex=max(30, int(settings.MONITOR_INTERVAL * 2))):
            log.info("monitor.skipped", check=name, reason="a previous run is still going")
            return {"skipped": True}
        try:
            return check(client)
        finally:
            client.delete(lock)
    finally:
        client.close()
