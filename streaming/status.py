"""The gateway's status record in Redis: what /health, the monitors and /metrics read.

The owner writes it every `GATEWAY_STATUS_INTERVAL` seconds with a TTL of ten intervals (a
minute at least), so a record that stops changing, or disappears, means the gateway is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
import structlog

from streaming.circuit import circuits_snapshot
from streaming.envelope import QUARANTINE_SUFFIX
from streaming.lock import wait_or_timeout
from wsgateway.logging import LogThrottle

if TYPE_CHECKING:
    from streaming.envelope import DataFrame, Malformed
    from streaming.gateway import Gateway

log = structlog.get_logger(__name__)

SAMPLE_CHARS = 200  # of a malformed frame or a quarantined item, in its log line


class Counters:
    """What went through the per-frame path, for the status record and the monitors."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.events_out = 0
        self.malformed = 0
        self.malformed_by_reason: dict[str, int] = defaultdict(int)
        self.quarantined = 0
        self.quarantined_by_reason: dict[str, int] = defaultdict(int)
        self.quarantined_at: float | None = None  # wall time of the last one, for the alert
        self.by_routing_key: dict[str, int] = defaultdict(int)  # for the monitors' overflow estimate
        self.resyncs = 0  # books resynced because the gateway was far behind (Gateway.shed)
        self.skipped = 0  # their deltas skipped meanwhile
        self.throttle = LogThrottle()

    def count_malformed(self, frame: Malformed, raw: str | bytes, socket: str) -> None:
        """Count a frame that could not be used; log it, at most once per reason in the throttle window."""
        self.malformed += 1
        self.malformed_by_reason[frame.reason] += 1
        suppressed = self.throttle.allow(f"malformed:{frame.reason}")
        if suppressed is not None:
            sample = raw[:SAMPLE_CHARS] if isinstance(raw, str) else repr(raw[:SAMPLE_CHARS])
            log.warning(
                "bybit.malformed_frame",
                socket=socket,
                reason=frame.reason,
                size=len(raw),
                sample=sample,
                suppressed=suppressed,
            )

    def count_quarantined(self, frame: DataFrame, socket: str) -> None:
        """Count the private items a frame sent to quarantine; log each reason at most once per throttle window."""
        self.quarantined_at = time.time()
        for bad in frame.quarantined:
            self.quarantined += 1
            self.quarantined_by_reason[bad.reason] += 1
            suppressed = self.throttle.allow(f"quarantined:{bad.reason}")
            if suppressed is not None:
                log.warning(
                    "bybit.item_quarantined",
                    socket=socket,
                    topic=frame.topic,
                    reason=bad.reason,
                    field=bad.field,
                    index=bad.index,
                    routing_key=f"{frame.event_class}{QUARANTINE_SUFFIX}",
                    trace_id=frame.events[0].trace_id,
                    sample=orjson.dumps(bad.item)[:SAMPLE_CHARS].decode(errors="replace"),
                    suppressed=suppressed,
                )

    def report_suppressed(self) -> None:
        """Log what the throttle held back and no later line reported: a repeat is never silent."""
        for key, count in self.throttle.overdue().items():
            kind, _, reason = key.partition(":")
            log.warning("bybit.lines_suppressed", kind=kind, reason=reason, suppressed=count)


def status_record(gw: Gateway) -> dict[str, Any]:
    """Everything an operator needs to see about one gateway process, as plain data."""
    publisher, counters = gw.publisher, gw.counters
    circuit, circuits = circuits_snapshot(gw.breakers)
    return {
        "updated_at": time.time(),
        "started_at": gw.started_at,
        "state": gw.state,
        "epoch": gw.lock.epoch,
        "circuit": circuit,  # the worst endpoint's breaker
        "circuits": circuits,  # every endpoint's breaker, by URL
        "sockets": [s.snapshot() for s in gw.sockets.values()],
        "publisher": {
            "connected": publisher.connected,
            "reconnects": publisher.reconnects,
            "last_error": publisher.last_error,
            "blocked": publisher.blocked,
        },
        "nudges_connected": bool(gw.reconciler.nudges and gw.reconciler.nudges.connected),
        "counters": {
            "frames_in": counters.frames_in,
            "events": counters.events_out,
            "published": publisher.published,
            "confirmed": publisher.confirmed,
            "republished": publisher.republished,
            "nacked": publisher.nacks,
            "returned": publisher.confirms.returns,
            "spilled": publisher.confirms.spilled,
            "reordered": publisher.confirms.reordered,
            "dropped": gw.handoff.dropped + publisher.confirms.market_nack_drops,
            "conflated": gw.handoff.conflated,
            "resyncs_behind": counters.resyncs,
            "skipped_resyncing": counters.skipped,
            "malformed": counters.malformed,
            "quarantined": counters.quarantined,
            "unencodable": publisher.unencodable,
        },
        "malformed_by_reason": dict(counters.malformed_by_reason),
        "quarantined_by_reason": dict(counters.quarantined_by_reason),
        "quarantined_at": counters.quarantined_at,
        "published_by_routing_key": dict(counters.by_routing_key),
        "handoff_depth": len(gw.handoff),
        "read_pauses": gw.handoff.read_pauses,
        "pacing": {  # reading late, or consumers behind: each book and ticker goes out at most once per interval
            "behind": gw.handoff.pacing.behind,
            "consumers_behind": gw.handoff.pacing.downstream,
            "interval_ms": gw.handoff.pacing.interval_ms,
            "held": len(gw.handoff.held),
        },
        "in_flight": publisher.in_flight,
        "private": {
            "parked": publisher.confirms.parked(),
            "spilling": publisher.confirms.spilling(),
            "spilled": publisher.confirms.spilled_by_queue(),
            "queues": len(publisher.confirms.lanes),
        },
        "recovery": {
            "backfills": gw.recovery.backfills,
            "backfilled_events": gw.recovery.backfilled_events,
            "snapshots": gw.recovery.snapshots,
            "last_backfill": gw.recovery.last_backfill,
            "last_error": gw.recovery.last_error or None,
            "failing_since": gw.recovery.failing_since,
        },
        "rejected_topics": len(gw.reconciler.rejected),
        "books": gw.market.snapshot(),
        "lvc": {"writes": gw.cache.writes, "errors": gw.cache.errors, "pending": len(gw.cache.dirty)},
        "balances": {
            "pending": len(gw.balances.pending),
            "written": gw.balances.written,
            "rejected": gw.balances.rejected,
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
            gw.counters.report_suppressed()
            try:
                await self.write(status_record(gw))
            except (aioredis.RedisError, OSError) as exc:
                if self.throttle.allow("status") is not None:
                    log.warning("gateway.status_write_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            await wait_or_timeout(stop, self.interval)
