"""The benchmark's consumer process: reads a service queue, checks `u` continuity per topic."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import amqp
import orjson

IDLE_WAIT = 0.2  # s: a read that waits this long with nothing to read ends a drain
POLL_EVERY = 0.05  # s: how often a consumer busy with messages looks at its commands
READ_CHUNK = 4096  # bytes asked of each recv()


def connect_reader(url: str) -> amqp.Connection:
    """A py-amqp connection for a consumer that should not become the delay it measures.

    As it comes, py-amqp reads each frame with three recv() calls of the exact sizes (nine a
    message) and, given a timeout, sets the socket's timeout twice a frame. Here each recv()
    asks for at least READ_CHUNK bytes (py-amqp keeps what is over for the next frame), and
    the timeout is set once: 53 -> 37 us of CPU a message on this machine, 30,000 messages.
    """
    from streaming.publisher import amqp_params

    conn = amqp.Connection(**amqp_params(url))
    conn.connect()
    transport = conn.transport
    recv = transport.sock.recv
    transport._quick_recv = lambda n: recv(max(n, READ_CHUNK))
    transport.sock.settimeout(IDLE_WAIT)  # drain_events(timeout=IDLE_WAIT) then leaves it alone
    return conn


def drain(conn: amqp.Connection, seconds: float = POLL_EVERY) -> bool:
    """Deliver messages for about `seconds`, or until none comes for IDLE_WAIT; whether any came."""
    until, got = time.monotonic() + seconds, False
    while True:
        try:
            conn.drain_events(timeout=IDLE_WAIT)
        except TimeoutError:
            return got
        got = True
        if time.monotonic() >= until:
            return True


def consume(url: str, queue: str, results: Connection, idle_stop: float = 1.5) -> None:
    """Consume until told to stop and the queue stays idle; send the tallies back on `results`.

    Latencies count only from the "measure" message on, so the backlog that built up before
    the consumer started does not pass for delivery latency.
    """
    conn = connect_reader(url)
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
        if drain(conn):
            idle_since = time.monotonic()
        elif stopping and time.monotonic() - idle_since > idle_stop:
            break
    conn.close()
    tally["unique"] = len(seen_ids)
    tally["topics"] = len(last_u)
    results.send(tally)
