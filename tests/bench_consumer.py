"""The benchmark's consumer process: reads a service queue, checks `u` continuity per topic."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import amqp
import orjson


def consume(url: str, queue: str, results: Connection, idle_stop: float = 1.5) -> None:
    """Consume until told to stop and the queue stays idle; send the tallies back on `results`.

    Latencies count only from the "measure" message on, so the backlog that built up before
    the consumer started does not pass for delivery latency.
    """
    from streaming.publisher import amqp_params

    conn = amqp.Connection(**amqp_params(url))
    conn.connect()
    channel = conn.channel()
    channel.basic_qos(0, 5000, False)
    last_u: dict[str, int] = {}
    tally: dict[str, Any] = {"received": 0, "gaps": 0, "duplicates": 0, "latencies_ms": [], "read_lags_ms": [],
                             "first_at": None}  # fmt: skip
    seen_ids: set[str] = set()

    def on_message(message: amqp.Message) -> None:
        now = time.time()
        event = orjson.loads(message.body)
        tally["received"] += 1
        if tally["first_at"] is None:
            tally["first_at"] = now
        tally["last_at"] = now
        if event["id"] in seen_ids:
            tally["duplicates"] += 1
            return
        seen_ids.add(event["id"])
        topic, u = event["topic"], event["u"]
        previous = last_u.get(topic)
        if previous is not None and event["type"] == "delta" and u != previous + 1:
            tally["gaps"] += 1
        last_u[topic] = u
        tally["latencies_ms"].append(now * 1000 - event["exchange_ts"])
        tally["read_lags_ms"].append(event["received_ts"] - event["exchange_ts"])  # Bybit's ts -> the gateway read it

    channel.basic_consume(queue, callback=on_message, no_ack=True)
    stopping = False
    idle_since = time.monotonic()
    while True:
        if not stopping and results.poll():
            if results.recv() == "measure":
                tally["latencies_ms"], tally["read_lags_ms"] = [], []
            else:
                stopping, idle_since = True, time.monotonic()
        try:
            conn.drain_events(timeout=0.2)
            idle_since = time.monotonic()
        except TimeoutError:
            if stopping and time.monotonic() - idle_since > idle_stop:
                break
    conn.close()
    tally["unique"] = len(seen_ids)
    tally["topics"] = len(last_u)
    results.send(tally)
