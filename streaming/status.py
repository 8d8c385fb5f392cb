"""The gateway's status record in Redis: what /health, the monitors and /metrics read.

The owner writes it every `GATEWAY_STATUS_INTERVAL` seconds with a TTL of ten intervals (a
minute at least), so a record that stops changing, or disappears, means the gateway is gone.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
import structlog

from streaming.lock import wait_or_timeout
from wsgateway.logging import LogThrottle

if TYPE_CHECKING:
    from streaming.gateway import Gateway

log = structlog.get_logger(__name__)


def status_record(gw: Gateway) -> dict[str, Any]:
    """Everything an operator needs to see about one gateway process, as plain data."""
    publisher = gw.publisher
    return {
        "updated_at": time.time(),
        "started_at": gw.started_at,
        "state": gw.state,
        "circuit": gw.breaker.snapshot(),
        "sockets": [s.snapshot() for s in gw.sockets.values()],
        "publisher": {
            "connected": publisher.connected,
            "reconnects": publisher.reconnects,
            "last_error": publisher.last_error,
        },
        "nudges_connected": bool(gw.nudges and gw.nudges.connected),
        "counters": {
            "frames_in": gw.frames_in,
            "events": gw.events_out,
            "published": publisher.published,
            "confirmed": publisher.confirmed,
            "republished": publisher.republished,
            "nacked": publisher.nacks,
            "dropped": gw.handoff.dropped + publisher.market_nack_drops,
            "malformed": gw.malformed,
        },
        "malformed_by_reason": dict(gw.malformed_by_reason),
        "published_by_routing_key": dict(gw.by_routing_key),
        "handoff_depth": len(gw.handoff),
        "read_pauses": gw.read_pauses,
        "in_flight": publisher.in_flight,
        "rejected_topics": len(gw.reconciler.rejected),
        "books": gw.market.snapshot(),
        "lvc": {"writes": gw.cache.writes, "errors": gw.cache.errors, "pending": len(gw.cache.dirty)},
        "balances": {
            "pending": len(gw.balances.pending),
            "written": gw.balances.written,
            "last_error": gw.balances.last_error,
        },
    }


class StatusWriter:
    """Writes the status record every `interval` seconds until stopped, and once more at the end."""

    def __init__(self, client: aioredis.Redis, key: str, interval: float) -> None:
        self.client = client
        self.key = key
        self.interval = interval
        self.throttle = LogThrottle()

    async def write(self, record: dict[str, Any]) -> None:
        await self.client.set(self.key, orjson.dumps(record), ex=max(60, int(self.interval * 10)))

    async def run(self, gw: Gateway, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.write(status_record(gw))
            except (aioredis.RedisError, OSError) as exc:
                if self.throttle.allow("status") is not None:
                    log.warning("gateway.status_write_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            await wait_or_timeout(stop, self.interval)
