"""Private-state recovery: back-fill from Bybit's REST API after every gap, and the watermark it starts from.

Bybit never re-sends a private event that arrived while no socket of ours listened. So after
every gap (start-up, takeover, a private reconnect) the owner asks Bybit's REST API for what
changed since its watermark, minus an overlap, and publishes it with the same content-derived
ids the WebSocket path gives (envelope.py `PRIVATE_IDS`): a consumer drops what it already has
by `id`. Executions come back complete (every `execId`), orders and positions at their latest
state, the wallet refreshed. Each class then gets a `resync` event (`<class>.resync`) naming
the window that was repaired.

The watermark (per class, in Redis) is a time before which every private event of that class
was confirmed by RabbitMQ: the oldest private event still unconfirmed, else now, frozen while
the private socket is down and held at the start of a back-fill until that back-fill is done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import redis.asyncio as aioredis
import structlog

from streaming.balances import rows_from_wallet
from streaming.bybitrest import BybitRest, BybitRestError
from streaming.envelope import PRIVATE_IDS, Event, envelope_head, now_ms
from streaming.lock import wait_or_timeout
from streaming.marketstate import position_key
from wsgateway.logging import LogThrottle

if TYPE_CHECKING:
    from streaming.gateway import Gateway

log = structlog.get_logger(__name__)

ORDER_CATEGORIES = ("linear", "spot", "inverse", "option")
POSITION_CATEGORIES = ("linear", "inverse", "option")
WALLET_ACCOUNTS = ("UNIFIED",)
TOPICS = {"order": "order", "execution": "execution", "position": "position", "balance": "wallet"}
CONFIRM_TIMEOUT = 30.0  # seconds for a back-fill's events to be confirmed before the watermark may move
CONFIRM_POLL = 0.05
# What a repair can fail on: Bybit (refused, unreachable, a reply of another shape), Redis. Each is retried.
REPAIR_ERRORS = (BybitRestError, OSError, httpx.HTTPError, aioredis.RedisError, ValueError, KeyError, TypeError)
TIME_FIELDS = {"order": "updatedTime", "execution": "execTime", "position": "updatedTime"}


def as_streamed(item: dict[str, Any], category: str) -> dict[str, Any]:
    """A REST list item as the WebSocket sends it: REST names the category once beside the list."""
    return {"category": category, **item} if category and "category" not in item else item


def rest_event(event_class: str, item: dict[str, Any], epoch: int, source: str = "rest") -> Event:
    """One (streamed-shape) REST item as the event the WebSocket path makes of it: the same id."""
    received_ts = now_ms()
    if event_class == "balance":
        symbol, routing_key = item.get("accountType", ""), f"balance.{item.get('accountType', '')}"
    else:
        symbol = item.get("symbol", "")
        routing_key = f"{event_class}.{item.get('category', '')}.{symbol}"
    event_id = PRIVATE_IDS[event_class](item, None)
    exchange_ts = item.get(TIME_FIELDS.get(event_class, ""))
    exchange_ts = int(exchange_ts) if isinstance(exchange_ts, str) and exchange_ts.isdigit() else exchange_ts
    trace_id = f"{source}-{event_id}"
    topic = TOPICS[event_class]
    head = envelope_head(event_id, event_class, topic, item.get("category", ""), symbol, "snapshot", exchange_ts,
                         received_ts, trace_id)  # fmt: skip
    body = orjson.dumps({**head, "u": None, "seq": item.get("seq"), "cts": None, "source": source, "data": item})
    return Event(event_id, trace_id, event_class, routing_key, body, True, topic, received_ts, epoch)


def resync_event(
    event_class: str, since_ms: int, until_ms: int, counts: dict[str, int], reason: str, epoch: int
) -> Event:
    """The `<class>.resync` event: the window [since, until] of this class was repaired from REST."""
    received_ts = now_ms()
    event_id = f"resync:{event_class}:{since_ms}:{until_ms}"
    body = orjson.dumps(
        {"id": event_id, "class": event_class, "type": "resync", "source": "rest", "received_ts": received_ts,
         "trace_id": event_id, "from_ts": since_ms, "to_ts": until_ms, "reason": reason, "counts": counts}
    )  # fmt: skip
    return Event(event_id, event_id, event_class, f"{event_class}.resync", body, True, "resync", received_ts, epoch)


def cache_field(position: dict[str, Any]) -> str:
    """The account cache's field for a position (marketstate.position_key)."""
    return position_key("", position.get("category", ""), position.get("symbol", ""), position.get("positionIdx", 0))[1]


def latest_orders(items: Iterable[dict[str, Any]], since_ms: int) -> list[dict[str, Any]]:
    """The newest state of each order updated at or after `since_ms`, oldest first."""
    newest: dict[str, dict[str, Any]] = {}
    for item in items:
        order_id = item.get("orderId")
        if not order_id or int(item.get("updatedTime") or 0) < since_ms:
            continue
        kept = newest.get(order_id)
        if kept is None or int(item.get("updatedTime") or 0) >= int(kept.get("updatedTime") or 0):
            newest[order_id] = item
    return sorted(newest.values(), key=lambda i: int(i.get("updatedTime") or 0))


class Recovery:
    """Back-fills the private classes after every gap and keeps the watermark they start from."""

    def __init__(self, gateway: Gateway, rest: BybitRest | None, overlap_ms: int, first_window_ms: int) -> None:
        self.gateway = gateway
        self.rest = rest
        self.overlap_ms = overlap_ms
        self.first_window_ms = first_window_ms  # how far back to look when no watermark was ever kept
        self.key = f"{gateway.config.redis_prefix}gateway:watermark"
        self.snapshot_key = f"{gateway.config.redis_prefix}gateway:snapshotted"
        self.snapshotted: set[str] = set()  # private queues that got their late-joiner snapshot
        self.snapshots_due: dict[str, str] = {}  # queue -> class
        self.snapshots = 0
        self.marks: dict[str, int] = {}  # class -> ms: everything before was confirmed
        self.floor: dict[str, int] = {}  # class -> ms: a back-fill from here is not confirmed yet
        self.gap = asyncio.Event()
        self.reasons: list[str] = []
        self.backfills = 0
        self.backfilled_events = 0
        self.last_backfill: dict[str, Any] | None = None
        self.last_error = ""
        self.failing_since: float | None = None  # epoch seconds of the first failure in a row
        self.throttle = LogThrottle()

    def request(self, reason: str) -> None:
        """Ask for a back-fill (start-up, takeover, private reconnect); requests while one runs coalesce.

        The watermark is held where it stands from now until that back-fill is confirmed.
        """
        now = now_ms()
        for event_class in self.gateway.reconciler.private_classes | set(self.marks):
            self.floor.setdefault(event_class, self.marks.get(event_class, now - self.first_window_ms))
        self.reasons.append(reason)
        self.gap.set()

    async def load(self, client: aioredis.Redis) -> None:
        """Read the watermark the previous owner left; the first back-fill starts there."""
        stored = await client.hgetall(self.key)
        self.marks = {k.decode(): int(v) for k, v in stored.items()}
        self.snapshotted = {m.decode() for m in await client.smembers(self.snapshot_key)}

    def live_queues(self, queues: dict[str, str]) -> None:
        """The private queues with an active subscription now ({queue: class}): a new one gets a snapshot, once."""
        if self.rest is None:
            return
        for queue, event_class in queues.items():
            if queue not in self.snapshotted and queue not in self.snapshots_due:
                self.snapshots_due[queue] = event_class
                self.gap.set()
        self.snapshotted &= set(queues)  # a queue subscribed again later is a late joiner again

    def watermarks(self, now: int) -> dict[str, int]:
        """Each class's watermark now: the oldest unconfirmed event, a back-fill's start, or the last frame read.

        While the private socket is down nothing moves: events may be happening that nobody reads.
        """
        sock = self.gateway.private_socket()
        if sock is None or sock.ws is None or not sock.live:
            return dict(self.marks)
        last_frame = int((sock.health.last_frame_at or 0) * 1000) or now
        pending = self.gateway.publisher.private_pending_since()
        marks = {}
        for event_class in set(self.gateway.reconciler.private_classes) | set(self.marks):
            mark = min(now, last_frame, pending.get(event_class, now), self.floor.get(event_class, now))
            marks[event_class] = max(mark, self.marks.get(event_class, 0))
        return marks

    async def save(self, client: aioredis.Redis) -> None:
        marks = self.watermarks(now_ms())
        if marks:
            self.marks.update(marks)
            await client.hset(self.key, mapping={k: str(v) for k, v in marks.items()})

    async def keep_watermark(self, client: aioredis.Redis, stop: asyncio.Event, interval: float) -> None:
        """Write the watermark every `interval` seconds while this instance owns the lock."""
        while not stop.is_set():
            try:
                await self.save(client)
            except (aioredis.RedisError, OSError) as exc:
                if self.throttle.allow("watermark") is not None:
                    log.warning("recovery.watermark_write_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            await wait_or_timeout(stop, interval)

    async def close(self) -> None:
        if self.rest is not None:
            await self.rest.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Back-fill whenever a gap is reported, one at a time, until `stop`."""
        while not stop.is_set():
            waiter = asyncio.ensure_future(self.gap.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            self.gap.clear()
            reasons, self.reasons = self.reasons, []
            try:
                if reasons:
                    await self.backfill(",".join(sorted(set(reasons))))
                if self.snapshots_due:
                    await self.snapshot()
            except REPAIR_ERRORS as exc:
                # A failed repair must not stop the gateway (the live stream goes on): say so loudly, retry.
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                self.failing_since = self.failing_since or time.time()
                log.error("recovery.backfill_failed", error=self.last_error, retry="on the next gap or in 30 s")
                asyncio.get_running_loop().call_later(30.0, self.request, "retry")
            else:
                self.last_error, self.failing_since = "", None

    async def backfill(self, reason: str) -> None:
        """Publish what Bybit's REST API has for each wanted private class since its watermark."""
        classes = self.gateway.reconciler.private_classes
        if self.rest is None or not classes:
            return
        until, epoch = now_ms(), self.gateway.envelopes.epoch
        started = time.monotonic()
        floors = dict(self.floor)
        counts: dict[str, int] = {}
        last_read = 0
        for event_class in sorted(classes):
            since = floors.get(event_class, self.marks.get(event_class, until - self.first_window_ms))
            since -= self.overlap_ms
            events = await self.fetch(event_class, since, until)
            events.append(resync_event(event_class, since, until, {"events": len(events)}, reason, epoch))
            for event in events:
                self.gateway.handoff.put(event)
            self.gateway.publisher.kick()
            counts[event_class] = len(events) - 1
            last_read = events[-1].received_ts
        if await self.confirmed(classes, last_read, CONFIRM_TIMEOUT):
            for event_class, floor in floors.items():
                if self.floor.get(event_class) == floor:  # not held again by a newer gap meanwhile
                    del self.floor[event_class]
        self.backfills += 1
        self.backfilled_events += sum(counts.values())
        self.last_backfill = {"reason": reason, "at": time.time(), "counts": counts,
                              "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
        log.info("recovery.backfilled", reason=reason, counts=counts, seconds=self.last_backfill["seconds"])

    async def snapshot(self) -> None:
        """Send each late joiner's queue, and that queue alone, the current state of its class (source: rest).

        A `resync` event with reason `snapshot` ends it, also when there was nothing to send.
        """
        due, self.snapshots_due = self.snapshots_due, {}
        epoch = self.gateway.envelopes.epoch
        sent: set[str] = set()
        self.snapshotted |= set(due)  # in flight: a reconcile meanwhile must not ask for them again
        for queue, event_class in due.items():
            try:
                events = self.events(event_class, await self.current(event_class))
            except REPAIR_ERRORS:
                unsent = {q: c for q, c in due.items() if q not in sent}
                self.snapshotted -= set(unsent)
                self.snapshots_due.update(unsent)
                raise
            now = now_ms()
            events.append(resync_event(event_class, now, now, {"events": len(events)}, "snapshot", epoch))
            self.gateway.publisher.to_queue(queue, events)
            sent.add(queue)
            self.snapshots += 1
            log.info("recovery.snapshot_sent", queue=queue, event_class=event_class, events=len(events))
        await self.gateway.redis.delete(self.snapshot_key)
        if self.snapshotted:
            await self.gateway.redis.sadd(self.snapshot_key, *self.snapshotted)

    async def confirmed(self, classes: Iterable[str], read_until: int, timeout: float) -> bool:
        """Wait until RabbitMQ confirmed every private event of `classes` read up to `read_until` (ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = self.gateway.publisher.private_pending_since()
            if all(pending.get(c, read_until + 1) > read_until for c in classes):
                return True
            await asyncio.sleep(CONFIRM_POLL)  # confirms of other events keep arriving: no one event to wait on
        return False

    async def fetch(self, event_class: str, since: int, until: int) -> list[Event]:
        """The events of one class Bybit knows of in [since, until]: complete or latest, as the class allows."""
        assert self.rest is not None
        items: list[dict[str, Any]] = []
        if event_class == "execution":
            for category in ORDER_CATEGORIES:
                found = await self.rest.executions(category, start_ms=since, end_ms=until)
                items += sorted((as_streamed(i, category) for i in found), key=lambda i: int(i.get("execTime") or 0))
        elif event_class == "order":
            for category in ORDER_CATEGORIES:
                found = await self.rest.open_orders(category)
                found += await self.rest.recent_closed_orders(category)
                found += await self.rest.order_history(category, start_ms=since, end_ms=until)
                items += latest_orders((as_streamed(i, category) for i in found), since)
        else:
            items = await self.current(event_class)
        return self.events(event_class, items)

    async def current(self, event_class: str) -> list[dict[str, Any]]:
        """What Bybit holds now for a class: open orders, positions, the wallet (executions have no state)."""
        assert self.rest is not None
        items: list[dict[str, Any]] = []
        if event_class == "order":
            for category in ORDER_CATEGORIES:
                items += [as_streamed(i, category) for i in await self.rest.open_orders(category)]
        elif event_class == "position":
            held = await self.gateway.cache.held("position")  # `<category>:<symbol>:<positionIdx>`
            for category in POSITION_CATEGORIES:
                found = [as_streamed(i, category) for i in await self.rest.positions(category)]
                listed = {cache_field(i) for i in found}
                # Bybit lists open positions only: one closed while nobody listened is asked for by symbol.
                for symbol in sorted({f.split(":")[1] for f in held - listed if f.startswith(f"{category}:")}):
                    by_symbol = [as_streamed(i, category) for i in await self.rest.positions(category, symbol=symbol)]
                    found += [i for i in by_symbol if cache_field(i) not in listed]
                items += found
        elif event_class == "balance":
            for account in WALLET_ACCOUNTS:
                items += await self.rest.wallet_balance(account)
        return items

    def events(self, event_class: str, items: list[dict[str, Any]]) -> list[Event]:
        """REST items as events; the account cache and the balance writer take them as they take the stream's."""
        epoch, cache, now = self.gateway.envelopes.epoch, self.gateway.cache, now_ms()
        for item in items:
            if event_class == "order":
                cache.order(item)
            elif event_class == "position":
                cache.position(item)
            elif event_class == "balance":
                for row in rows_from_wallet(item, now):
                    self.gateway.balances.offer(row)
        return [rest_event(event_class, item, epoch) for item in items]
