"""Benchmark (a): the raw limit of publishing to RabbitMQ from Python on this machine.

Two publishers send the same pre-built envelopes to a durable topic exchange bound to one
durable queue, confirms on: the bare py-amqp pipelined loop of shared/perf-notes.md (the
baseline), and the gateway's own `Publisher` thread.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import amqp
import orjson

from tests.bench_gateway import cpu_of, pids_named

URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
EXCHANGE, QUEUE, KEY = "ws-gateway.events", "ws-gateway.bench.raw", "trade.linear.BTCUSDT"
BODY = orjson.dumps(
    {
        "id": "0",
        "class": "trade",
        "topic": "publicTrade.BTCUSDT",
        "category": "linear",
        "symbol": "BTCUSDT",
        "type": "snapshot",
        "exchange_ts": 1700000000000,
        "received_ts": 1700000000001,
        "trace_id": "t",
        "u": None,
        "seq": 1,
        "cts": None,
        "data": [
            {
                "T": 1700000000000,
                "s": "BTCUSDT",
                "S": "Buy",
                "v": "0.001",
                "p": "37000.50",
                "L": "PlusTick",
                "i": "20f43950-d8dd-5b31-9112-a178eb6023af",
                "BT": False,
                "seq": 1,
            }
        ],
    }
)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def setup() -> None:
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    ch = conn.channel()
    ch.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
    ch.queue_declare(QUEUE, durable=True, auto_delete=False, arguments={"x-max-length": 2_000_000})
    ch.queue_bind(QUEUE, EXCHANGE, KEY)
    ch.queue_purge(QUEUE)
    conn.close()


def teardown() -> None:
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    conn.channel().queue_delete(QUEUE)
    conn.close()


def raw_pyamqp(n: int, window: int = 2000) -> dict[str, float]:
    """The perf-notes loop: confirm_select, raw publishes, acks drained by callback."""
    setup()
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    ch = conn.channel()
    acked = [0]
    ch.events["basic_ack"].add(lambda tag, multiple: acked.__setitem__(0, max(acked[0], tag)))
    ch.confirm_select()
    broker = pids_named("beam.smp")
    t0, c0, b0 = time.perf_counter(), cpu(), cpu_of(broker)
    for i in range(1, n + 1):
        ch._basic_publish(
            amqp.Message(BODY, delivery_mode=1, content_type="application/json"), exchange=EXCHANGE, routing_key=KEY
        )
        while i - acked[0] > window:
            conn.drain_events(timeout=5)
    while acked[0] < n:
        conn.drain_events(timeout=5)
    wall, used, broker_used = time.perf_counter() - t0, cpu() - c0, cpu_of(broker) - b0
    conn.close()
    return {"per_s": n / wall, "cpu_us": used / n * 1e6, "broker_cpu_us": broker_used / n * 1e6}


def gateway_publisher(n: int, per_s: int | None = None) -> dict[str, float]:
    """The gateway's Publisher on the gateway's event loop, fed from a full hand-off or `per_s` events a second.

    Fed at a rate, as the sockets feed it, each pass writes a few events, not BATCH: per event
    that costs more than publishing a full hand-off.
    """
    import asyncio

    import uvloop
    from django.conf import settings

    from streaming.envelope import Event
    from streaming.publisher import Handoff, Publisher

    setup()
    handoff = Handoff(n + 1)
    events = [Event(str(i), "t", "trade", KEY, BODY, False, "publicTrade.BTCUSDT", 1_700_000_000_000) for i in range(n)]
    if per_s is None:
        for event in events:
            handoff.put(event)

    async def publish_all() -> float:
        publisher = Publisher(URL, handoff)
        stop = asyncio.Event()
        task = asyncio.create_task(publisher.run(stop))
        while not publisher.connected:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        if per_s is not None:
            put = 0
            while put < n:  # every millisecond, what is due
                due = min(n, int((time.perf_counter() - started) * per_s))
                for event in events[put:due]:
                    handoff.put(event)
                put = due
                publisher.kick()
                await asyncio.sleep(0.001)
        if not await publisher.flush(120):
            raise RuntimeError("publisher did not confirm everything")
        wall = time.perf_counter() - started
        stop.set()
        publisher.close()
        await task
        return wall

    c0 = cpu()
    wall = (uvloop.run if settings.GATEWAY_UVLOOP else asyncio.run)(publish_all())
    return {"per_s": n / wall, "cpu_us": (cpu() - c0) / n * 1e6}


def publisher_at(per_s: int, seconds: float = 5.0) -> float:
    """CPU us per event of the Publisher alone, fed `per_s` events a second: one end of (b)'s floor at (b)'s rate."""
    try:
        return round(gateway_publisher(int(per_s * seconds), per_s)["cpu_us"], 1)
    finally:
        teardown()


def run(n: int = 30_000) -> dict[str, Any]:
    try:
        raw = raw_pyamqp(n)
        ours = gateway_publisher(n)
    finally:
        teardown()
    return {
        "raw_publish_per_s": round(raw["per_s"]),
        "raw_publish_cpu_us": round(raw["cpu_us"], 1),
        "raw_broker_cpu_us": round(raw["broker_cpu_us"], 1),
        "publisher_per_s": round(ours["per_s"]),
        "publisher_cpu_us": round(ours["cpu_us"], 1),
        "publisher_vs_raw": round(ours["per_s"] / raw["per_s"], 2),
    }


if __name__ == "__main__":
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsgateway.settings")
    os.environ.setdefault("DJANGO_DEBUG", "true")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    django.setup()
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 30_000))
