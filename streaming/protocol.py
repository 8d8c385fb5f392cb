"""Bybit's subscription protocol without I/O: topics wanted, live and in flight; requests out, replies in.

`Subscriptions` is one connection's sans-I/O core, as websockets' protocol.py is to its
asyncio shell: it takes wanted topics, Bybit's replies and the time, and returns the requests
to send and what each reply means. `streaming/bybit.py` does the sending and the reading.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import orjson

ARGS_PER_REQUEST = 10  # spot refuses more; batch at 10 everywhere, resubscribes included
ARGS_CHARS_PER_CONNECTION = 21_000  # linear/inverse/option limit on one connection's args
TOPICS_PER_CONNECTION = 200  # our own cap, so one socket never carries the whole market
AUTH_EXPIRES_MARGIN_MS = 10_000  # pybit's 1 s fails on clock skew
REPLY_DEADLINE = 10.0  # seconds a request may wait for its reply before `expired()` names it
REPLY_RESENDS = 2  # times an unanswered request is sent again before the connection is given up
ALREADY_SUBSCRIBED = "already subscribed"
TOPIC_IN_MESSAGE = re.compile(r"topic:([A-Za-z0-9._-]+)")


def batches(topics: Iterable[str], size: int = ARGS_PER_REQUEST) -> Iterator[list[str]]:
    items = sorted(topics)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fits(topics: Iterable[str], extra: str = "") -> bool:
    """True if these topics (plus `extra`) stay within one connection's limits."""
    items = [*topics, *([extra] if extra else [])]
    return len(items) <= TOPICS_PER_CONNECTION and sum(len(t) for t in items) <= ARGS_CHARS_PER_CONNECTION


def auth_args(api_key: str, api_secret: str, now_ms: int) -> list[Any]:
    """The `args` of Bybit's auth request: key, expires (ms), HMAC-SHA256 of GET/realtime+expires."""
    expires = now_ms + AUTH_EXPIRES_MARGIN_MS
    signature = hmac.new(api_secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
    return [api_key, expires, signature]


def auth_request(api_key: str, api_secret: str, now_ms: int) -> str:
    return orjson.dumps({"req_id": "auth", "op": "auth", "args": auth_args(api_key, api_secret, now_ms)}).decode()


@dataclass(frozen=True, slots=True)
class AuthReply:
    """Bybit's answer to the auth request; `error` is its ret_msg when refused."""

    accepted: bool
    error: str = ""


def auth_reply(raw: str | bytes) -> AuthReply | None:
    """Read a frame that arrived after the auth request; None if it is something else."""
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(reply, dict) or reply.get("op") != "auth":
        return None
    if reply.get("success"):
        return AuthReply(True)
    return AuthReply(False, str(reply.get("ret_msg") or "auth refused")[:200])


@dataclass(frozen=True, slots=True)
class Request:
    """One subscribe or unsubscribe request and the (monotonic) time it was made."""

    req_id: str
    op: str
    topics: tuple[str, ...]
    sent_at: float
    resends: int = 0  # times sent before this, under the same req_id

    def text(self) -> str:
        return orjson.dumps({"req_id": self.req_id, "op": self.op, "args": self.topics}).decode()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one reply means for the connection's owner."""

    acked: tuple[str, ...] = ()  # newly live and still wanted: their subscriptions are active
    rejected: tuple[tuple[str, str], ...] = ()  # (topic, Bybit's ret_msg): no longer wanted
    send: tuple[Request, ...] = ()  # one-topic retries of a batch Bybit refused without naming
    sync: bool = False  # desired and live may differ now: send what `sync()` returns


NOTHING = Outcome()


@dataclass(frozen=True, slots=True)
class Overdue:
    """Requests past their reply deadline: sent again, or given up on (the connection no longer answers)."""

    resend: tuple[Request, ...] = ()
    give_up: tuple[Request, ...] = ()


class Subscriptions:
    """One connection's topics: desired, live and in flight, kept equal through Bybit's replies."""

    def __init__(self, deadline: float = REPLY_DEADLINE, resends: int = REPLY_RESENDS) -> None:
        # Changed in place, never rebound: the I/O shell keeps references for its per-frame check.
        self.desired: set[str] = set()
        self.live: set[str] = set()
        self.in_flight: dict[str, Request] = {}  # by req_id, in the order sent
        self.resent: set[str] = set()  # req_ids sent more than once: a second reply may come
        self.repairs: set[str] = set()  # topics asked to be resubscribed in this loop turn
        self.deadline = deadline
        self.resends = resends
        self.req_ids = itertools.count(1)

    def want(self, topics: Iterable[str]) -> None:
        """Replace the wanted topics; `sync()` then returns the requests that get there."""
        wanted = set(topics)
        self.desired.clear()
        self.desired.update(wanted)

    def sync(self, now: float) -> list[Request]:
        """Subscribe what is wanted and unsubscribe what is not, except topics already in flight."""
        subscribing, unsubscribing = self.in_flight_topics("subscribe"), self.in_flight_topics("unsubscribe")
        requests = [self.request("subscribe", b, now) for b in batches(self.desired - self.live - subscribing)]
        requests += [self.request("unsubscribe", b, now) for b in batches(self.live - self.desired - unsubscribing)]
        return requests

    def repair(self, topics: Iterable[str], now: float) -> list[Request]:
        """Unsubscribe live topics, ARGS_PER_REQUEST a request; each ack makes `sync()` subscribe them again.

        Each then comes back with a fresh snapshot. Topics not live, or already being
        unsubscribed, are left out.
        """
        unsubscribing = self.in_flight_topics("unsubscribe")
        due = (t for t in topics if t in self.live and t not in unsubscribing)
        return [self.request("unsubscribe", b, now) for b in batches(due)]

    def ask_repair(self, topic: str) -> bool:
        """Note a topic to resubscribe; True for the first since the last `repair_asked()` (send them then)."""
        first = not self.repairs
        self.repairs.add(topic)
        return first

    def repair_asked(self, now: float) -> list[Request]:
        """`repair()` every topic asked for since the last call: a gateway far behind asks for hundreds at once."""
        topics, self.repairs = self.repairs, set()
        return self.repair(topics, now)

    def in_flight_topics(self, op: str) -> set[str]:
        return {t for r in self.in_flight.values() if r.op == op for t in r.topics}

    def reply(self, msg: dict[str, Any], now: float) -> Outcome:
        """Settle the request a subscribe/unsubscribe reply answers; other replies mean nothing here."""
        op = msg.get("op")
        if op not in ("subscribe", "unsubscribe"):
            return NOTHING
        request = self.answered(op, msg.get("req_id"))
        if request is None:
            return NOTHING
        topics = request.topics
        if op == "unsubscribe":
            self.live.difference_update(topics)
            return Outcome(sync=True)  # a topic still wanted (a repair) is asked for again
        if msg.get("success"):
            return self.confirm(topics)
        ret_msg = str(msg.get("ret_msg", ""))
        named = [t for t in TOPIC_IN_MESSAGE.findall(ret_msg) if t in topics]
        if ALREADY_SUBSCRIBED in ret_msg:
            # Harmless: the first subscription keeps delivering (bybit-v5-protocol.md §3).
            rest = [t for t in topics if t not in named] if named else []
            return replace(self.confirm(named or topics), send=self.retries(rest, now))
        refused = named or (list(topics) if len(topics) == 1 else [])
        self.desired.difference_update(refused)
        # A refusal that does not name every topic: ask for the others one by one.
        rest = [t for t in topics if t not in refused]
        return Outcome(rejected=tuple((t, ret_msg) for t in refused), send=self.retries(rest, now))

    def disconnect(self) -> None:
        """The connection ended: nothing is live and no reply will come."""
        self.live.clear()
        self.in_flight.clear()
        self.resent.clear()

    def expired(self, now: float) -> list[Request]:
        """Requests still unanswered past their deadline, oldest first; the deadline doubles with each resend."""
        return [r for r in self.in_flight.values() if now - r.sent_at > self.deadline * 2**r.resends]

    def overdue(self, now: float) -> Overdue:
        """Send expired requests again under the same req_id, `resends` times; then give up on them.

        A request given up on means the connection takes requests and answers none: the shell
        replaces it, and the new connection asks again for everything wanted.
        """
        resend, give_up = [], []
        for request in self.expired(now):
            if request.resends >= self.resends:
                give_up.append(request)
                continue
            again = replace(request, sent_at=now, resends=request.resends + 1)
            self.in_flight[request.req_id] = again
            self.resent.add(request.req_id)
            resend.append(again)
        return Overdue(tuple(resend), tuple(give_up))

    def request(self, op: str, topics: Iterable[str], now: float) -> Request:
        request = Request(f"{op[:3]}-{next(self.req_ids)}", op, tuple(topics), now)
        self.in_flight[request.req_id] = request
        return request

    def retries(self, topics: list[str], now: float) -> tuple[Request, ...]:
        return tuple(self.request("subscribe", [t], now) for t in topics)

    def answered(self, op: str, req_id: str | None) -> Request | None:
        request = self.in_flight.pop(req_id, None) if req_id else None
        if request is None and req_id in self.resent:
            return None  # the late reply to the other copy of a request already answered
        if request is None:
            # The private socket may not echo req_id: replies come in request order.
            request = next((r for r in self.in_flight.values() if r.op == op), None)
            if request is not None:
                del self.in_flight[request.req_id]
        return request

    def confirm(self, topics: Iterable[str]) -> Outcome:
        fresh = [t for t in topics if t not in self.live]
        self.live.update(fresh)
        wanted = tuple(t for t in fresh if t in self.desired)
        # Fresh but unwanted: dropped while the request was in flight, so sync() unsubscribes it.
        return Outcome(acked=wanted, sync=len(wanted) < len(fresh))
