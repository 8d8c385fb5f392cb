"""Benchmark: cost of one order-book delta (apply + read the top for the cache), 50 and 200 levels; and of the
gateway's whole pure per-frame path (parse, envelope, book, cache mark) on the same deltas, in process."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson

from streaming.envelope import Envelopes
from streaming.marketstate import LastValueCache, MarketState, OrderBook


def deltas(depth: int, count: int, seed: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = random.Random(seed)
    bids = [f"{10_000 - i * 0.5:.2f}" for i in range(depth)]
    asks = [f"{10_000 + (i + 1) * 0.5:.2f}" for i in range(depth)]
    snapshot = {"b": [[p, "1.000"] for p in bids], "a": [[p, "1.000"] for p in asks], "u": 1}
    messages = []
    for u in range(2, count + 2):
        changes = []
        for _ in range(rng.randrange(1, 4)):
            price = rng.choice(bids)
            changes.append([price, "0" if rng.random() < 0.2 else f"{rng.randrange(1, 999) / 100:.3f}"])
        messages.append({"b": changes, "a": [[rng.choice(asks), "2.000"]], "u": u})
    return snapshot, messages


def cost_us(depth: int, count: int = 50_000, read_top_every: int = 1) -> float:
    snapshot, messages = deltas(depth, count)
    book = OrderBook()
    book.apply("snapshot", snapshot)
    started = time.perf_counter()
    for i, message in enumerate(messages):
        book.apply("delta", message)
        if i % read_top_every == 0:
            book.top(50)
    return (time.perf_counter() - started) / count * 1e6


def frame_path_us(depth: int = 50, count: int = 50_000) -> float:
    """Microseconds per frame of Envelopes.handle + MarketState.keep on book deltas: no socket, no broker.

    The part of the gateway's CPU per event between its two I/O ends, without their noise.
    """
    snapshot, messages = deltas(depth, count)
    topic = "orderbook.50.BTCUSDT"
    frames = [orjson.dumps({"topic": topic, "type": "snapshot", "ts": 1, "data": {"s": "BTCUSDT", **snapshot}})]
    frames += [orjson.dumps({"topic": topic, "type": "delta", "ts": m["u"], "data": {"s": "BTCUSDT", **m}})
               for m in messages]  # fmt: skip
    texts = [frame.decode() for frame in frames]
    state = MarketState(LastValueCache(None, "bench:", 50, 0.1))  # type: ignore[arg-type]  # marks only, no flush
    envelopes = Envelopes("bench", state)
    started = time.perf_counter()
    for text in texts:
        state.keep(envelopes.handle(text, "linear"))  # type: ignore[arg-type]
    return (time.perf_counter() - started) / len(texts) * 1e6


def run() -> dict[str, float]:
    return {
        "frame_path_us": round(min(frame_path_us() for _ in range(3)), 2),
        "book50_delta_us": round(cost_us(50, read_top_every=10**9), 2),
        "book200_delta_us": round(cost_us(200, read_top_every=10**9), 2),
        "book50_delta_plus_top50_us": round(cost_us(50), 2),
        "book200_delta_plus_top50_us": round(cost_us(200), 2),
    }


if __name__ == "__main__":
    print(run())
