"""Overload: a hand-off that is behind sends each book's and ticker's newest state, never a backlog of deltas.

Pure: frames go through Envelopes (with market state) into a Handoff, and what the publisher
would take out is judged by a consumer that rebuilds every book from what it receives.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import orjson

from streaming.envelope import SKIPPED, DataFrame, Envelopes, Event
from streaming.marketstate import MarketState, OrderBook
from streaming.publisher import (
    EASE_EVERY_MS,
    LAG_WINDOW_MS,
    LATE_FOR_MS,
    STAY_PACED_MS,
    WIDEN_EVERY_MS,
    Handoff,
    Pacing,
)

BOOK = "orderbook.50.BTCUSDT"


def book_frames(count: int, seed: int = 7, ts_of: Callable[[int], int] = lambda u: 1_000 + u) -> list[str]:
    """A snapshot of 50 levels a side, then `count` deltas (some deleting a level, some adding one); `ts` by `u`."""
    rng = random.Random(seed)
    bids = [f"{30_000 - i * 0.5:.1f}" for i in range(50)]
    asks = [f"{30_001 + i * 0.5:.1f}" for i in range(50)]
    data = {"s": "BTCUSDT", "b": [[p, "1.0"] for p in bids], "a": [[p, "1.0"] for p in asks], "u": 1, "seq": 1}
    frames = [{"topic": BOOK, "type": "snapshot", "ts": ts_of(1) - 1, "data": data}]
    for u in range(2, count + 2):
        bid = [f"{30_000 - rng.randrange(70) * 0.5:.1f}", rng.choice(("0", "2.5", "0.3"))]
        ask = [f"{30_001 + rng.randrange(70) * 0.5:.1f}", rng.choice(("0", "4"))]
        delta = {"s": "BTCUSDT", "b": [bid], "a": [ask], "u": u, "seq": u}
        frames.append({"topic": BOOK, "type": "delta", "ts": ts_of(u), "data": delta})
    return [orjson.dumps(frame).decode() for frame in frames]


def gateway(conflate_at: int, pacing: Pacing | None = None) -> tuple[Envelopes, Handoff]:
    """Envelopes and a hand-off wired as the gateway wires them: a frame that folds gets no envelope."""
    envelopes = Envelopes("run", MarketState())
    envelopes.lazy = True
    handoff = Handoff(100_000, conflate_at=conflate_at, render=envelopes.latest, pacing=pacing, build=envelopes.event)
    return envelopes, handoff


def offer(envelopes: Envelopes, handoff: Handoff, raw: str, category: str = "linear", read_at: int = 0) -> int:
    """Hand one frame over as the gateway does; `read_at` (ms), when given, is the moment it was read."""
    frame = envelopes.handle(raw, category)
    assert isinstance(frame, DataFrame), frame
    if read_at:
        frame.received_ts = read_at
    return handoff.offer(frame)


def taken(handoff: Handoff) -> list[dict]:
    bodies = []
    while (event := handoff.take()) is not None:
        bodies.append(orjson.loads(event.body))
    return bodies


def rebuild(bodies: list[dict]) -> OrderBook:
    """What a consumer does: a snapshot replaces its book, a delta must follow on from the last `u`."""
    book = OrderBook()
    for body in bodies:
        if body["type"] == "delta":
            assert body["u"] == book.u + 1, f"a delta that does not follow: u {body['u']} after {book.u}"
        book.apply(body["type"], body["data"])
    return book


def test_a_book_behind_is_sent_as_one_snapshot_of_its_newest_state_that_rebuilds_the_same_book() -> None:
    envelopes, handoff = gateway(conflate_at=0)  # behind from the first frame
    frames = book_frames(500)
    queued = sum(offer(envelopes, handoff, raw) for raw in frames)
    assert (queued, handoff.conflated, len(handoff)) == (1, 500, 1)
    (body,) = taken(handoff)
    assert (body["type"], body["conflated"], body["u"], body["exchange_ts"]) == ("snapshot", True, 501, 1_501)
    received = rebuild([body])
    truth = OrderBook()
    for raw in frames:
        message = orjson.loads(raw)
        truth.apply(message["type"], message["data"])
    assert received.top(100) == truth.top(100) and received.u == truth.u


def test_deltas_after_a_conflated_snapshot_follow_on_from_it() -> None:
    """Behind for a while, then caught up: snapshot, then deltas whose u goes on; the book stays exact."""
    envelopes, handoff = gateway(conflate_at=3)
    filler = orjson.dumps({"topic": "publicTrade.ETHUSDT", "ts": 1, "data": [{"p": "1", "v": "1"}]}).decode()
    frames = book_frames(300)
    received = []
    for n, raw in enumerate(frames):
        if n == 10:
            for _ in range(3):  # a burst of trades puts the hand-off behind
                offer(envelopes, handoff, filler)
        offer(envelopes, handoff, raw)
        if n % 50 == 49:  # the publisher catches up now and then
            received += [b for b in taken(handoff) if b["class"] == "orderbook"]
    received += [b for b in taken(handoff) if b["class"] == "orderbook"]
    assert any(b.get("conflated") for b in received) and received[-1]["type"] == "delta"
    truth = OrderBook()
    for raw in frames:
        message = orjson.loads(raw)
        truth.apply(message["type"], message["data"])
    rebuilt = rebuild(received)
    assert rebuilt.top(100) == truth.top(100) and rebuilt.u == truth.u


def test_a_ticker_behind_keeps_only_its_newest_merged_state() -> None:
    envelopes, handoff = gateway(conflate_at=0)
    ticker = "tickers.BTCUSDT"
    first = {"symbol": "BTCUSDT", "lastPrice": "100", "volume24h": "5"}
    messages = [{"topic": ticker, "type": "snapshot", "ts": 1, "cs": 1, "data": first}]
    for n in range(2, 40):
        change = {"symbol": "BTCUSDT", "lastPrice": str(100 + n)}
        messages.append({"topic": ticker, "type": "delta", "ts": n, "cs": n, "data": change})
    for message in messages:
        offer(envelopes, handoff, orjson.dumps(message).decode())
    (body,) = taken(handoff)
    assert (body["type"], body["conflated"], body["exchange_ts"]) == ("snapshot", True, 39)
    assert body["data"] == {"symbol": "BTCUSDT", "lastPrice": "139", "volume24h": "5"}


def test_trades_never_conflate_and_private_events_go_first() -> None:
    envelopes, handoff = gateway(conflate_at=0)
    for n in range(50):
        trade = {"topic": "publicTrade.BTCUSDT", "ts": n, "data": [{"i": str(n), "p": "1", "v": "1"}]}
        offer(envelopes, handoff, orjson.dumps(trade).decode())
    handoff.put(Event("order:1", "t", "order", "order.linear.BTCUSDT", b"{}", True, "order", 1))
    bodies = [handoff.take()]
    assert bodies[0] is not None and bodies[0].private  # an order update waits behind no market backlog
    trades = taken(handoff)
    assert [t["data"][0]["i"] for t in trades] == [str(n) for n in range(50)] and handoff.conflated == 0


def test_a_topic_left_while_it_waited_is_counted_not_sent() -> None:
    envelopes, handoff = gateway(conflate_at=0)
    for raw in book_frames(5):
        offer(envelopes, handoff, raw)
    assert envelopes.state is not None
    envelopes.state.forget("linear", {BOOK})
    assert taken(handoff) == [] and handoff.dropped == 1


def test_below_the_threshold_every_delta_is_sent() -> None:
    envelopes, handoff = gateway(conflate_at=1_000)
    frames = book_frames(200)
    assert sum(offer(envelopes, handoff, raw) for raw in frames) == 201 and handoff.conflated == 0
    assert [b["u"] for b in taken(handoff)] == list(range(1, 202))


def test_a_frame_that_folds_gets_no_envelope_and_one_published_as_it_is_gets_the_same_as_ever() -> None:
    ticker = {"topic": "tickers.BTCUSDT", "type": "snapshot", "cs": 1, "ts": 9, "data": {"symbol": "BTCUSDT"}}
    frames = [*book_frames(50), orjson.dumps(ticker).decode()]
    eager = Envelopes("run", MarketState())
    expected = []
    for raw in frames:
        frame = eager.handle(raw, "linear")
        assert isinstance(frame, DataFrame)
        expected += [orjson.loads(event.body) for event in frame.events]
    envelopes, handoff = gateway(conflate_at=10**9)  # nothing folds
    assert sum(offer(envelopes, handoff, raw) for raw in frames) == 52
    got = taken(handoff)
    for body in expected + got:
        del body["received_ts"]  # the moment each was read
    assert got == expected
    envelopes, handoff = gateway(conflate_at=0)  # every frame after the first folds
    made = []
    for raw in frames[:-1]:
        frame = envelopes.handle(raw, "linear")
        assert isinstance(frame, DataFrame) and frame.events == [] and frame.pending
        handoff.offer(frame)
        made.append(len(frame.events))
    assert made == [0] * 51 and handoff.conflated == 50  # one place, rendered when taken; no envelope made
    (body,) = taken(handoff)
    assert (body["conflated"], body["u"]) == (True, 51)


def test_a_steady_read_lag_is_not_late_nor_is_one_hiccup_but_a_lasting_rise_is() -> None:
    pacing = Pacing(limit_ms=100, base_ms=100, max_ms=400)
    # Every frame read 3 s after its exchange time (a clock offset, a long link): the usual, not late.
    assert not any(pacing.late(t, t - 3_000) for t in range(0, 10_000, 20))
    # One 200 ms pause: the frames it held up are read in a burst, late, then all is on time again.
    assert not any(pacing.late(t, t - 3_200) for t in range(10_000, 10_010))
    assert not any(pacing.late(t, t - 3_000) for t in range(10_020, 12_000, 20))
    # 200 ms later than usual, on and on: behind once it has lasted LATE_FOR_MS, and until it eases.
    late = [pacing.late(t, t - 3_200) for t in range(12_000, 13_000, 10)]
    assert late.index(True) * 10 == LATE_FOR_MS and all(late[late.index(True) :])
    assert pacing.late(13_500, 13_500 - 3_000)  # read on time again, but still behind
    now = 12_990 + EASE_EVERY_MS  # the last late read, and EASE_EVERY_MS on time
    pacing.ease(now - 1)
    assert pacing.behind and pacing.interval_ms == 400  # widened while the reads stayed late
    while pacing.behind:
        pacing.ease(now)
        now += EASE_EVERY_MS
    assert not pacing.late(now, now - 3_000)


def test_the_longer_the_gateway_stays_behind_the_less_often_a_topic_goes_out() -> None:
    pacing = Pacing(limit_ms=100, base_ms=100, max_ms=400)
    pacing.late(0, 0)
    start = 1 + LATE_FOR_MS
    assert not any(pacing.late(t, t - 200) for t in range(1, start))  # every frame 200 ms late
    intervals = {}
    for t in range(start, start + 4 * WIDEN_EVERY_MS, 10):
        assert pacing.late(t, t - 200)
        intervals[(t - start) // WIDEN_EVERY_MS] = pacing.interval_ms
    assert intervals == {0: 100, 1: 200, 2: 400, 3: 400}
    # A long overload does not become the new usual: still late after several baseline windows.
    assert all(pacing.late(t, t - 200) for t in range(start + 4 * WIDEN_EVERY_MS, 3 * LAG_WINDOW_MS, 100))
    assert pacing.interval_ms == 400


def test_while_behind_a_late_read_widens_however_sparse_the_reads_are() -> None:
    # A held topic is not read again until its interval is over: the reads come in bursts.
    pacing = Pacing(limit_ms=100, base_ms=100, max_ms=1_600)
    pacing.late(0, 0)
    entered = next(t for t in range(1, 2 * LATE_FOR_MS, 10) if pacing.late(t, t - 500))
    assert pacing.interval_ms == 100
    for t in range(entered + WIDEN_EVERY_MS, entered + 5 * WIDEN_EVERY_MS, WIDEN_EVERY_MS):
        assert pacing.late(t, t - 500)  # one late read a widening apart, gaps far over LATE_GAP_MS
    assert pacing.interval_ms == 1_600


def test_once_on_time_the_interval_eases_step_by_step_and_pacing_ends_below_the_base() -> None:
    pacing = Pacing(limit_ms=100, base_ms=100, max_ms=400)
    pacing.late(0, 0)
    t = 0
    while pacing.interval_ms < 400:
        t += 10
        pacing.late(t, t - 200)
    last_late = t
    eased = []
    for now in range(last_late, last_late + 4 * EASE_EVERY_MS + 1, 50):  # no frame at all: the timer alone
        pacing.ease(now)
        eased.append((pacing.behind, pacing.interval_ms))
    assert [step for n, step in enumerate(eased) if n == 0 or step != eased[n - 1]] == [
        (True, 400),
        (True, 200),
        (True, 100),
        (False, 100),
    ]
    # Behind again later: from the base, as a new overload.
    again = [pacing.late(u, u - 200) for u in range(t + 5 * EASE_EVERY_MS, t + 5 * EASE_EVERY_MS + 2 * LATE_FOR_MS, 10)]
    assert again.index(True) * 10 == LATE_FOR_MS and pacing.interval_ms == 100


def test_consumers_behind_pace_at_once_though_reads_are_on_time_and_pacing_ends_only_well_after() -> None:
    pacing = Pacing(limit_ms=100, base_ms=100, max_ms=400)
    assert not any(pacing.late(t, t - 5) for t in range(0, 1_000, 10))  # reads on time: not behind
    pacing.consumers_behind(True, 1_000)  # a service's market queue holds a backlog
    assert pacing.late(1_010, 1_005)  # behind with the next read, no LATE_FOR_MS wait
    assert all(pacing.late(t, t - 5) for t in range(1_020, 1_020 + 2 * WIDEN_EVERY_MS, 10))
    assert pacing.interval_ms == 400  # widened while the backlog stayed
    pacing.consumers_behind(False, 1_600)  # caught up
    now = 1_600
    while pacing.interval_ms > 100 or now < 1_600 + 3 * EASE_EVERY_MS:
        now += EASE_EVERY_MS
        pacing.ease(now)
    assert pacing.behind and pacing.interval_ms == 100  # eased to the base, and stays there
    assert pacing.late(now + 10, now + 5)
    pacing.ease(1_000 + STAY_PACED_MS + EASE_EVERY_MS)
    assert not pacing.behind  # long after the last backlog, the full rate is tried again


def test_a_book_resyncing_skips_its_deltas_until_a_snapshot_makes_it_whole_again() -> None:
    envelopes = Envelopes("run", MarketState())
    frames = book_frames(6)
    for raw in frames[:3]:
        envelopes.handle(raw, "linear")
    book = envelopes.state.books[("linear", BOOK)]
    book.consistent, book.shedding = False, True  # Gateway.shed: far behind, resubscribed
    assert all(envelopes.handle(raw, "linear") is SKIPPED for raw in frames[3:])
    assert book.u == 3  # nothing applied meanwhile
    snapshot = orjson.loads(frames[0])
    snapshot["data"]["u"] = 9
    frame = envelopes.handle(orjson.dumps(snapshot).decode(), "linear")
    assert isinstance(frame, DataFrame) and book.consistent and not book.shedding and book.u == 9


def test_while_reading_late_a_book_goes_out_once_an_interval_as_its_newest_state() -> None:
    envelopes, handoff = gateway(100_000, Pacing(limit_ms=100, base_ms=100, max_ms=100))
    now = time.time_ns() // 1_000_000
    handoff.pacing.late(now - 1_000, now - 1_000)  # read on time a second ago, and 500 ms late since
    assert not any(handoff.pacing.late(t, t - 500) for t in range(now - LATE_FOR_MS, now, 50))
    frames = book_frames(203, ts_of=lambda u: now - 500)
    queued = sum(offer(envelopes, handoff, raw, read_at=now) for raw in frames[:201])
    trade = {"topic": "publicTrade.BTCUSDT", "ts": now - 500, "data": [{"i": "t1", "p": "1", "v": "1"}]}
    offer(envelopes, handoff, orjson.dumps(trade).decode(), read_at=now)
    # The snapshot goes out (its topic's interval starts), then one held place for the 200 deltas.
    assert (queued, handoff.conflated, len(handoff.held)) == (2, 199, 1)
    first = taken(handoff)
    assert [(b["class"], b["type"]) for b in first] == [("orderbook", "snapshot"), ("trade", "snapshot")]
    slot = handoff.next_at[("linear", BOOK)]
    assert now < slot <= now + 100  # its interval's end, in the topic's own slot
    # At the slot it waits for news: the next frame read sends it at once, that frame included.
    assert handoff.release(slot) == 0
    offer(envelopes, handoff, frames[201], read_at=slot)
    assert not handoff.held
    (latest,) = taken(handoff)
    assert (latest["conflated"], latest["u"], latest["received_ts"]) == (True, 202, slot)
    truth = OrderBook()
    for raw in frames[:202]:
        message = orjson.loads(raw)
        truth.apply(message["type"], message["data"])
    rebuilt = rebuild([first[0], latest])
    assert rebuilt.top(100) == truth.top(100) and rebuilt.u == truth.u
    # A topic with no news after its slot goes out from the timer, base_ms later.
    offer(envelopes, handoff, frames[202], read_at=slot + 1)
    quiet = handoff.next_at[("linear", BOOK)]
    assert handoff.release(quiet + 99) == 0 and handoff.release(quiet + 100) == 1
    assert [b["u"] for b in taken(handoff)] == [203]
    # A flush (shutdown, handover) sends what is held at once, its interval over or not.
    delta = {"s": "BTCUSDT", "b": [["29990.0", "0"]], "a": [], "u": 204, "seq": 204}
    offer(envelopes, handoff, orjson.dumps({"topic": BOOK, "type": "delta", "ts": now - 500, "data": delta}).decode(),
          read_at=quiet + 101)  # fmt: skip
    assert len(handoff.held) == 1 and handoff.release(quiet + 101, every=True) == 1
    assert [b["u"] for b in taken(handoff)] == [204]


def test_paced_topics_go_out_spread_over_the_interval_not_all_at_once() -> None:
    pacing = Pacing(limit_ms=100, base_ms=1_000, max_ms=1_000)
    envelopes, handoff = gateway(100_000, pacing)
    pacing.behind, pacing.interval_ms, pacing.changed_at = True, 1_000, 1 << 62  # reading late, at 1 s
    topics = [f"orderbook.50.SYM{i:03d}USDT" for i in range(400)]
    read_at = time.time_ns() // 1_000_000
    for topic in topics:  # all 400 behind at the same moment: each sends its frame, and holds the next
        for u in (1, 2):
            data = {"s": topic[13:], "b": [["1", "1"]], "a": [["2", "1"]], "u": u}
            frame = {"topic": topic, "type": "snapshot" if u == 1 else "delta", "ts": 0, "data": data}
            offer(envelopes, handoff, orjson.dumps(frame).decode(), read_at=read_at)
    assert len(handoff.held) == 400
    start, end = min(handoff.next_at.values()), max(handoff.next_at.values())
    assert read_at < start and end <= read_at + 1_000  # each in its own slot of the next interval
    released = []
    for now in range(start, end + 1_050, 50):  # the gateway's 50 ms tick; quiet topics go base_ms past their slot
        due = [key for key in handoff.held if handoff.next_at[key] <= now - 1_000]
        released.append(handoff.release(now))
        assert all(now < handoff.next_at[key] <= now + 1_000 for key in due)  # next in its slot, an interval on
    assert sum(released) == 400 and max(released) <= 3 * 400 // 20  # about 20 a tick, never all at once
