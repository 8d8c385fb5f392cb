"""Pure frame handling: one Bybit text frame -> control reply, or the envelopes to publish.

Parsed once with orjson; no I/O, no settings. The envelope is the message body every consumer
reads (README "Event contract"): `id` (dedupe key), `class`, `topic`, `category`, `symbol`,
`type`, `exchange_ts`, `received_ts`, `trace_id`, Bybit's sequence fields `u`, `seq`, `cts`,
and `data` exactly as Bybit sent it (for private topics: one item of Bybit's `data` list).
With market state on, order books add `consistent` (and `gap` when a `u` was skipped) and
tickers add `merged`, the complete ticker after Bybit's delta was applied.

Private ids come from the item's content (`private_id`), so an owner, its standby, a restart
or a back-fill give one Bybit event one id; market ids are `<run>-<frame>-<item>`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import InvalidOperation
from typing import Any

import orjson

from streaming.marketstate import RESYNCING, MarketState
from subscriptions.topics import CHANNEL_BY_BYBIT, Channel

# Per-category private topics ("order.linear") route like their plain form.
PRIVATE_SUFFIXES = ("spot", "linear", "inverse", "option", "fast")
# A private item without the fields its routing key needs goes to `<class>.unknown`, which every
# queue of its class receives through its `<class>.#` binding (docs/gateway.md, quarantine).
QUARANTINE_SUFFIX = ".unknown"
MAX_ID_BYTES = 200  # of a content-derived id: AMQP's message_id is a shortstr (255 bytes)
MAX_ROUTES = 20_000  # public topics whose route is remembered (a gateway holds a few thousand)


@dataclass(slots=True)
class Event:
    """One message for RabbitMQ; `body` is the serialised envelope."""

    id: str
    trace_id: str
    event_class: str
    routing_key: str
    body: bytes
    private: bool
    bybit_topic: str
    received_ts: int
    epoch: int = 0  # the fencing epoch of the lease it was read under (streaming.lock)


@dataclass(frozen=True, slots=True)
class ControlReply:
    """A reply to one of our requests (auth, subscribe, ping): the socket handles it."""

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that could not be used, and why."""

    reason: str
    topic: str = ""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A private item that could not be routed, and why; it is published to `<class>.unknown`."""

    reason: str
    field: str  # the missing field, "item" (not an object) or "data" (not a list)
    item: Any
    index: int = 0  # in Bybit's `data` list


@dataclass(slots=True)
class DataFrame:
    """A data frame of one topic and the events it became."""

    topic: str
    parsed: dict[str, Any]  # the decoded frame, for market state
    event_class: str
    category: str  # the socket's category ("private" for the private socket)
    symbol: str = ""
    param: str = ""  # the depth or interval of the topic
    trace_id: str = ""  # of a public frame: its event's, and of a snapshot rendered from it
    received_ts: int = 0
    routing_key: str = ""
    extra: dict[str, Any] | None = None  # the market-state fields of its envelope (`consistent`, `gap`, `merged`)
    events: list[Event] = field(default_factory=list)
    gap: bool = False  # an order-book `u` was skipped: the topic needs a fresh snapshot
    merged: dict[str, Any] | None = None  # the complete ticker
    quarantined: tuple[Quarantined, ...] = ()  # private items published to `<class>.unknown`
    conflatable: bool = False  # a book or ticker whose newest state the gateway holds whole (Envelopes.latest)
    pending: bool = False  # its event is not made yet: Envelopes.event makes it if it is published as it is


class Skipped:
    """A delta of a book the gateway is resyncing while far behind (Gateway.shed): not applied, nor published."""


SKIPPED = Skipped()
Frame = ControlReply | Malformed | DataFrame | Skipped


@dataclass(frozen=True, slots=True)
class Route:
    """What every frame of one public topic shares, worked out from its name once."""

    key: tuple[str, str]  # (socket category, Bybit topic): the key of its book
    event_class: str
    symbol: str
    param: str  # the depth or interval of the topic
    routing_key: str
    book: bool
    ticker: bool


def public_route(category: str, topic: str) -> Route | None:
    """The route of a public topic, or None when its name is not one Bybit publishes."""
    head, _, rest = topic.partition(".")
    spec = CHANNEL_BY_BYBIT.get(head)
    if spec is None or spec.private or not rest:
        return None
    if spec.has_depth or spec.has_interval:
        param, _, symbol = rest.partition(".")
        if not symbol:
            return None
        routing_key = f"{spec.event_class}.{category}.{symbol}.{param}"
    else:
        param, symbol = "", rest
        routing_key = f"{spec.event_class}.{category}.{symbol}"
    ticker = spec.event_class == "ticker"
    return Route((category, topic), spec.event_class, symbol, param, routing_key, spec.has_depth, ticker)


class Envelopes:
    """Turns frames into events; owns the frame counter behind trace ids and market ids."""

    def __init__(self, run_id: str | None = None, state: MarketState | None = None) -> None:
        # Market ids are `<run>-<frame>-<item>`: unique across restarts, cheap to make, and the
        # same when an unconfirmed event is re-published, so consumers can dedupe on `id`.
        self.run_id = run_id or os.urandom(6).hex()
        self.frame_no = 0
        self.state = state
        self.epoch = 0  # set by the gateway from its lease
        self.routes: dict[tuple[str, str], Route] = {}  # (socket category, Bybit topic) -> what its frames share
        # Set by the gateway, whose hand-off folds most books and tickers while it reads late:
        # their envelopes are made only if they are published as they are (Envelopes.event).
        self.lazy = False

    def handle(self, raw: str | bytes, category: str) -> Frame:
        """Classify and wrap one frame received on a socket of `category` ("private" for the private one)."""
        if isinstance(raw, bytes):  # a binary frame, or a text frame streaming.wsread could not decode
            try:
                raw.decode()
            except UnicodeDecodeError:
                return Malformed("invalid UTF-8")
            return Malformed("binary frame")
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Malformed("invalid JSON")
        if not isinstance(msg, dict):
            return Malformed("not a JSON object")
        topic = msg.get("topic")
        if topic is None:
            if "op" in msg or "success" in msg:
                return ControlReply(msg)
            return Malformed("neither a data frame nor a control message")
        if not isinstance(topic, str):
            return Malformed("topic is not a string")
        self.frame_no += 1
        trace_id = f"{self.run_id}-{self.frame_no}"
        received_ts = time.time_ns() // 1_000_000
        if category == "private":
            return self.private_frame(msg, topic, trace_id, received_ts)
        return self.public_frame(msg, topic, category, trace_id, received_ts)

    def public_frame(self, msg: dict[str, Any], topic: str, category: str, trace_id: str, received_ts: int) -> Frame:
        key = (category, topic)
        route = self.routes.get(key)
        if route is None:
            route = public_route(category, topic)
            if route is None:
                return Malformed("unknown topic", topic)
            if len(self.routes) >= MAX_ROUTES:  # topics nobody subscribed to must not grow it for ever
                self.routes.clear()
            self.routes[key] = route
        data = msg.get("data")
        if data is None:
            return Malformed("missing data", topic)
        state: dict[str, Any] = {}
        frame = DataFrame(topic, msg, route.event_class, category, route.symbol, route.param, trace_id, received_ts,
                          route.routing_key, state)  # fmt: skip
        if route.book:
            if not isinstance(data, dict):
                return Malformed("orderbook data is not an object", topic)
            if self.state is not None:
                try:
                    update = self.state.book(route.key, msg.get("type", "snapshot"), data)
                except (KeyError, TypeError, ValueError, InvalidOperation):
                    return Malformed("orderbook data without u, b or a", topic)
                if update is RESYNCING:
                    return SKIPPED
                state["consistent"] = frame.conflatable = update.consistent
                if update.gap:
                    state["gap"] = {"expected_u": update.expected_u, "received_u": update.received_u}
                    frame.gap = True
        elif self.state is not None and route.ticker and isinstance(data, dict):
            frame.merged = state["merged"] = self.state.ticker(
                category, route.symbol, msg.get("type", "snapshot"), data
            )
            frame.conflatable = True
        if frame.conflatable and self.lazy:
            frame.pending = True
        else:
            self.event(frame)
        return frame

    def event(self, frame: DataFrame) -> Event:
        """Make (and add to `frame.events`) the event of a public frame, its envelope around Bybit's `data`."""
        msg = frame.parsed
        data = msg["data"]
        if frame.event_class == "orderbook":
            u, seq = data.get("u"), data.get("seq")
        else:
            u, seq = None, msg.get("cs")
        kind = msg.get("type", "snapshot")
        event = self.market_event(frame, f"{frame.trace_id}-0", kind, u, seq, data, frame.extra or {})
        frame.events.append(event)
        frame.pending = False
        return event

    def latest(self, frame: DataFrame) -> Event | None:
        """The newest state of a book or ticker topic as one snapshot event (`"conflated": true`), or None if gone.

        For a frame the hand-off folded (it was behind): rendered when the publisher takes it, from
        the gateway's own book or merged ticker, which every frame read so far has updated. The
        frame named is the topic's latest: its times and trace id are the snapshot's. A consumer
        replaces its book with it and applies the deltas that follow (their `u` goes on from it).
        """
        state, msg = self.state, frame.parsed
        assert state is not None
        if frame.event_class == "orderbook":
            book = state.books.get((frame.category, frame.topic))
            if book is None:
                return None
            bids, asks = book.top(max(len(book.bids), len(book.asks)))
            u, seq = book.u, book.seq
            data: dict[str, Any] = {"s": frame.symbol, "b": bids, "a": asks, "u": u, "seq": seq}
            extra: dict[str, Any] = {"consistent": book.consistent, "conflated": True}
        else:
            merged = state.tickers.get((frame.category, frame.symbol))
            if merged is None:
                return None
            u, seq, data, extra = None, msg.get("cs"), merged, {"merged": merged, "conflated": True}
        return self.market_event(frame, f"{frame.trace_id}-latest", "snapshot", u, seq, data, extra)

    def market_event(
        self, frame: DataFrame, event_id: str, kind: str, u: Any, seq: Any, data: Any, extra: dict[str, Any]
    ) -> Event:
        """The event of a public frame: the envelope (README "Event contract") around `data`, then `extra`."""
        msg = frame.parsed
        # envelope_head's fields, written out: one dict per market event, not two.
        body = orjson.dumps({
            "id": event_id, "class": frame.event_class, "topic": frame.topic, "category": frame.category,
            "symbol": frame.symbol, "type": kind, "exchange_ts": msg.get("ts"), "received_ts": frame.received_ts,
            "trace_id": frame.trace_id, "u": u, "seq": seq, "cts": msg.get("cts"), "data": data, **extra,
        })  # fmt: skip
        return Event(event_id, frame.trace_id, frame.event_class, frame.routing_key, body, False, frame.topic,
                     frame.received_ts, self.epoch)  # fmt: skip

    def private_frame(self, msg: dict[str, Any], topic: str, trace_id: str, received_ts: int) -> Frame:
        """One event per item of Bybit's list; an item that cannot be routed is quarantined, never dropped."""
        spec = private_channel(topic)
        if spec is None:
            return Malformed("unknown topic", topic)
        event_class = spec.event_class
        items = msg.get("data")
        if not isinstance(items, list):
            bad = Quarantined(f"{event_class} data is not a list", "data", items)
            event = self.quarantine(bad, event_class, topic, msg, trace_id, received_ts)
            return DataFrame(topic, {**msg, "data": []}, event_class, "private", events=[event], quarantined=(bad,))
        exchange_ts = msg.get("creationTime")
        make_id = PRIVATE_IDS[event_class]
        balance = event_class == "balance"
        events = []
        quarantined: list[Quarantined] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                missing = "item"
            elif balance:
                category, symbol = "", item.get("accountType")
                missing = "" if isinstance(symbol, str) and symbol else "accountType"
            else:
                category, symbol = item.get("category"), item.get("symbol")
                if not isinstance(category, str) or not category:
                    missing = "category"
                elif not isinstance(symbol, str) or not symbol:
                    missing = "symbol"
                else:
                    missing = ""
            if missing:
                reason = (
                    f"{event_class} item is not an object"
                    if missing == "item"
                    else f"{event_class} item without {missing}"
                )
                bad = Quarantined(reason, missing, item, index)
                quarantined.append(bad)
                events.append(self.quarantine(bad, event_class, topic, msg, trace_id, received_ts))
                continue
            event_id = make_id(item, exchange_ts)
            routing_key = f"balance.{symbol}" if balance else f"{event_class}.{category}.{symbol}"
            head = envelope_head(
                event_id, event_class, topic, category, symbol, "snapshot", exchange_ts, received_ts, trace_id
            )
            body = orjson.dumps({**head, "u": None, "seq": item.get("seq"), "cts": None, "bybit_id": msg.get("id"),
                                 "data": item})  # fmt: skip
            events.append(
                Event(event_id, trace_id, event_class, routing_key, body, True, topic, received_ts, self.epoch)
            )
        if quarantined:
            # Market state (the balance writer) reads `parsed`: it sees only the items that were routed.
            bad_indexes = {q.index for q in quarantined}
            parsed = {**msg, "data": [item for index, item in enumerate(items) if index not in bad_indexes]}
            return DataFrame(topic, parsed, event_class, "private", events=events, quarantined=tuple(quarantined))
        return DataFrame(topic, msg, event_class, "private", events=events)

    def quarantine(
        self, bad: Quarantined, event_class: str, topic: str, msg: dict[str, Any], trace_id: str, received_ts: int
    ) -> Event:
        """The event of an item that cannot be routed: `<class>.unknown`, its data as Bybit sent it, persistent."""
        exchange_ts = msg.get("creationTime")
        # The frame's time too: the same bad item sent again later is another event, not a repeat.
        event_id = f"{event_class}:unknown:{content_hash([exchange_ts, bad.item])}"
        head = envelope_head(event_id, event_class, topic, "", "", "snapshot", exchange_ts, received_ts, trace_id)
        body = orjson.dumps({**head, "u": None, "seq": None, "cts": None, "bybit_id": msg.get("id"),
                             "quarantine": {"reason": bad.reason, "field": bad.field}, "data": bad.item})  # fmt: skip
        return Event(
            event_id, trace_id, event_class, f"{event_class}{QUARANTINE_SUFFIX}", body, True, topic, received_ts,
            self.epoch,
        )  # fmt: skip


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of Bybit's times and of `received_ts`."""
    return time.time_ns() // 1_000_000


def envelope_head(
    event_id: str,
    event_class: str,
    topic: str,
    category: str,
    symbol: str,
    kind: str,
    exchange_ts: int | None,
    received_ts: int,
    trace_id: str,
) -> dict[str, Any]:
    """The fields every envelope starts with (README "Event contract")."""
    return {
        "id": event_id,
        "class": event_class,
        "topic": topic,
        "category": category,
        "symbol": symbol,
        "type": kind,
        "exchange_ts": exchange_ts,
        "received_ts": received_ts,
        "trace_id": trace_id,
    }


def private_channel(topic: str) -> Channel | None:
    head, _, suffix = topic.partition(".")
    spec = CHANNEL_BY_BYBIT.get(head)
    if spec is None or not spec.private or (suffix and suffix not in PRIVATE_SUFFIXES):
        return None
    return spec


def content_hash(value: Any) -> str:
    """A short hash of canonical JSON: equal for equal content, whatever the key order."""
    return hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def joined_id(prefix: str, item: dict[str, Any], *parts: Any) -> str:
    """`<prefix>:<part>:...`, or `<prefix>:hash:<content hash>` when a part is missing or the id would be too long.

    AMQP carries a message id of 255 bytes at most; a Bybit field of absurd length must not make
    an event the broker cannot take.
    """
    if any(part is None or part == "" for part in parts):
        return f"{prefix}:hash:{content_hash(item)}"
    joined = ":".join((prefix, *map(str, parts)))
    return joined if len(joined.encode()) <= MAX_ID_BYTES else f"{prefix}:hash:{content_hash(item)}"


def execution_id(item: dict[str, Any], creation_time: Any) -> str:
    return joined_id("exec", item, item.get("execId"))


def order_id(item: dict[str, Any], creation_time: Any) -> str:
    # One order has many updates: its id names the state (time, status, filled quantity).
    return joined_id(
        "order", item, item.get("orderId"), item.get("updatedTime"), item.get("orderStatus"), item.get("cumExecQty")
    )


def position_id(item: dict[str, Any], creation_time: Any) -> str:
    return joined_id(
        "position", item, item.get("category"), item.get("symbol"), item.get("positionIdx"), item.get("seq")
    )


def wallet_id(item: dict[str, Any], creation_time: Any) -> str:
    # Two updates of one account in the same millisecond must not share an id (a consumer
    # would drop the second): the coin list's hash tells them apart.
    coins = item.get("coin")
    return joined_id("wallet", item, item.get("accountType"), creation_time, content_hash(coins) if coins else None)


PRIVATE_IDS: dict[str, Callable[[dict[str, Any], Any], str]] = {
    "execution": execution_id,
    "order": order_id,
    "position": position_id,
    "balance": wallet_id,
}
