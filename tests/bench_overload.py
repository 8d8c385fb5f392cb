"""Benchmark (e): the gateway under overload, judged by an independent consumer.

The simulator pushes books, tickers and trades of `symbols` linear symbols at a fixed rate
(twice what the gateway sustained in (b)), and order events through its control API. The
consumer knows nothing of the gateway's counters: it rebuilds every book from what it receives
(a delta must follow on from the `u` before it; a book must never cross), and counts each trade
topic's messages against what the simulator says it sent.
"""

from __future__ import annotations

import multiprocessing
import signal
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import quote

import amqp
import orjson
import requests

from tests import bench_consumer
from tests import bench_gateway as bg

# Bybit's cadence per linear symbol at rate 1: book.50 every 20 ms, ticker and trades every 100 ms.
EVENTS_PER_SYMBOL = 50 + 10 + 10
API_KEY, API_SECRET = "bench-key", "bench-secret"
CLASSES = ("orderbook", "ticker", "trade", "order")
WARM_DELAY_MS = 500  # measuring starts after a second whose market events all arrived sooner than this
WARM_UP_TIMEOUT = 60.0


def subscribe_all(symbols: int) -> None:
    """Books, tickers and trades of `symbols` linear symbols, and orders, for the bench service."""
    from subscriptions import topics

    wanted = [("order", "", "", None)]
    for i in range(1, symbols + 1):
        symbol = f"SYM{i:04d}USDT"
        wanted += [("orderbook", "linear", symbol, 50), ("ticker", "linear", symbol, None),
                   ("trades", "linear", symbol, None)]  # fmt: skip
    rows = []
    for channel, category, symbol, depth in wanted:
        topic = topics.resolve(channel, category, symbol, depth)
        rows.append((bg.SERVICE, channel, topic.category, topic.symbol, depth, "", topic.event_class,
                     topic.bybit_topic, topic.routing_key, topic.queue_name(bg.SERVICE), "pending", ""))  # fmt: skip
    bg.insert_subscriptions(rows)


def apply_levels(side: dict[str, str], levels: list[list[str]]) -> None:
    for price, size in levels:
        if float(size) == 0:
            side.pop(price, None)
        else:
            side[price] = size


def is_crossed(book: dict[str, dict[str, str]]) -> bool:
    bids, asks = book["b"], book["a"]
    return bool(bids and asks) and max(map(float, bids)) >= min(map(float, asks))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, int(len(ordered) * q) - 1)], 1)


def consume(url: str, classes: tuple[str, ...], results: Connection, idle_stop: float = 2.0) -> None:
    """Read the bench service's queues of `classes` until told to stop and they stay idle; send the tallies back.

    Latencies count only from the "measure" message until "stop" (the overload window). An order
    counts once, at its first copy, as for a consumer that dedupes by id: a late joiner's REST
    snapshot or a back-fill may send one again later, with the same id and its old exchange time.
    """
    conn = bench_consumer.connect_reader(url)
    channel = conn.channel()
    channel.basic_qos(0, 5000, False)
    books: dict[str, dict[str, Any]] = {}
    trade_messages: dict[str, set[int]] = {}
    trade_seqs: dict[str, set[int]] = {}
    tally: dict[str, Any] = {"received": 0, "books_inconsistent": 0, "gaps": 0, "crossed": 0, "conflated": 0,
                             "delta_before_snapshot": 0, "orders": 0, "orders_from_rest": 0,
                             "order_repeats": 0}  # fmt: skip
    latencies: dict[str, list[float]] = {name: [] for name in (*CLASSES, "read_lag", "private_read_lag", "after_read")}
    measuring = [False]
    orders_seen: set[str] = set()
    lag_by_second: dict[int, float] = {}
    delay_by_second: dict[int, float] = {}  # the longest exchange ts -> receipt of each second read
    arrival_max: dict[int, float] = {}  # the longest delay of each second of arrival, measuring or not

    def on_message(message: amqp.Message) -> None:
        now = time.time() * 1000
        event = orjson.loads(message.body)
        tally["received"] += 1
        cls, exchange_ts = event["class"], event.get("exchange_ts")
        if exchange_ts is not None and cls != "order":
            arrival = int(now // 1000)
            arrival_max[arrival] = max(arrival_max.get(arrival, 0), now - exchange_ts)
        if cls == "order":
            if event.get("source") == "rest":
                tally["orders_from_rest"] += 1
            if event["id"] in orders_seen:  # a consumer that dedupes by id takes the first copy
                tally["order_repeats"] += 1
                return
            orders_seen.add(event["id"])
        if measuring[0] and exchange_ts is not None:  # a back-fill's resync marker has no exchange time
            latencies.setdefault(cls, []).append(now - exchange_ts)
            read_lag = event["received_ts"] - exchange_ts
            latencies["private_read_lag" if cls == "order" else "read_lag"].append(read_lag)
            if cls != "order":
                latencies["after_read"].append(now - event["received_ts"])  # publish, RabbitMQ, this process
                latencies.setdefault(f"{cls}:read_lag", []).append(read_lag)
                latencies.setdefault(f"{cls}:after_read", []).append(now - event["received_ts"])
                second = event["received_ts"] // 1000
                lag_by_second[second] = max(lag_by_second.get(second, 0), read_lag)
                delay_by_second[second] = max(delay_by_second.get(second, 0), round(now - exchange_ts))
        if cls == "orderbook":
            topic, data = event["topic"], event["data"]
            if event.get("conflated"):
                tally["conflated"] += 1
            if event["type"] == "snapshot":
                book = books[topic] = {"u": event["u"], "b": {}, "a": {}, "bad": False}
            else:
                book = books.get(topic)
                if book is None:
                    tally["delta_before_snapshot"] += 1
                    return
                if event["u"] != book["u"] + 1:
                    tally["gaps"] += 1
                    book["bad"] = True
                book["u"] = event["u"]
            apply_levels(book["b"], data["b"])
            apply_levels(book["a"], data["a"])
            if is_crossed(book):
                tally["crossed"] += 1
                book["bad"] = True
        elif cls == "trade":
            seqs = [item["seq"] for item in event["data"]]
            trade_messages.setdefault(event["topic"], set()).add(seqs[0])
            trade_seqs.setdefault(event["topic"], set()).update(seqs)
        elif cls == "order":
            tally["orders"] += 1

    for cls in classes:
        channel.basic_consume(f"ws-gateway.{bg.SERVICE}.{cls}", callback=on_message, no_ack=True)
    stopping = warming = False
    idle_since = time.monotonic()
    while True:
        if not stopping and results.poll():
            command = results.recv()
            if command == "warm":
                warming = True
            elif command == "measure":
                measuring[0], warming = True, False
            else:
                measuring[0], stopping, idle_since = False, True, time.monotonic()
        last_second = int(time.time()) - 1
        if warming and arrival_max.get(last_second, WARM_DELAY_MS) < WARM_DELAY_MS:
            warming = False
            results.send("steady")  # a whole second of arrivals less late than WARM_DELAY_MS
        if bench_consumer.drain(conn):
            idle_since = time.monotonic()
        elif stopping and time.monotonic() - idle_since > idle_stop:
            break
    conn.close()
    tally["books_inconsistent"] = sum(1 for book in books.values() if book["bad"]) + tally["delta_before_snapshot"]
    tally["books"] = len(books)
    tally["trade_messages"] = {topic: len(firsts) for topic, firsts in trade_messages.items()}
    # Trade seq is +1 per trade from 1 (simulator): a hole below the highest seq received is a lost trade.
    tally["trade_seq_holes"] = sum(max(seqs) - len(seqs) for seqs in trade_seqs.values())
    tally["latencies"] = {name: values for name, values in latencies.items()}
    tally["lag_by_second"] = [lag_by_second[k] for k in sorted(lag_by_second)]
    tally["delay_by_second"] = [delay_by_second[k] for k in sorted(delay_by_second)]
    results.send(tally)


def tally_of(pipe: Connection) -> dict[str, Any]:
    """A consumer's tally; a "steady" it sent just as measuring began (never steady before) is skipped."""
    message = pipe.recv()
    return pipe.recv() if message == "steady" else message


def emit_orders(control: str, stop: threading.Event, per_second: float, sent: list[str]) -> None:
    """Order events through the simulator's control API, `per_second`, until `stop`."""
    n = 0
    while not stop.wait(1 / per_second):
        n += 1
        body = {"symbol": "BTCUSDT", "category": "linear", "price": str(100 + n)}
        reply = requests.post(f"{control}/control/orders", json=body, timeout=5)
        reply.raise_for_status()
        sent.append(reply.json()["result"]["id"])


def sim_sent(control: str) -> dict[str, int]:
    return requests.get(f"{control}/control/stats", timeout=10).json()["result"]["sent"]


def broker_backlog() -> int:
    """Messages waiting in the bench vhost's queues (RabbitMQ's view, refreshed every few seconds)."""
    url = f"http://127.0.0.1:15672/api/queues/{quote(bg.VHOST, safe='')}"
    return sum(q.get("messages", 0) for q in requests.get(url, auth=("guest", "guest"), timeout=10).json())


def run(events_per_s: float, seconds: float = 20.0, symbols: int = 200) -> dict[str, Any]:
    """`events_per_s` offered (books, tickers, trades of `symbols` symbols) for `seconds`, orders at 20/s."""
    rate = events_per_s / (EVENTS_PER_SYMBOL * symbols)
    bg.prepare()
    subscribe_all(symbols)
    sim_port, control_port = bg.free_port(), bg.free_port()
    control = f"http://127.0.0.1:{control_port}"
    simulator = bg.start(["bybit_simulator", "--port", str(sim_port), "--control-port", str(control_port),
                          "--rate", f"{rate:.4f}", "--symbols", str(symbols), "--api-key", API_KEY,
                          "--api-secret", API_SECRET])  # fmt: skip
    bg.wait_port(sim_port)
    bg.wait_port(control_port)
    gateway_env = {f"QUEUE_MAX_LENGTH_{cls.upper()}": "0" for cls in ("orderbook", "ticker", "trade")}
    gateway_env.update(BYBIT_WS_URL=f"ws://127.0.0.1:{sim_port}", BYBIT_REST_URL=control, BYBIT_API_KEY=API_KEY,
                       BYBIT_API_SECRET=API_SECRET)  # fmt: skip
    gateway = bg.start(["run_gateway"], gateway_env)
    try:
        bg.wait_live(symbols * 3 + 1)
        # Market data and orders each have their own consumer, as a trading service would: an order
        # must not wait behind market messages in one consumer's socket.
        pipes, consumers = [], []
        for classes in (CLASSES[:3], CLASSES[3:]):
            parent, child = multiprocessing.Pipe()
            consumer = multiprocessing.get_context("spawn").Process(
                target=consume, args=(bg.AMQP_URL, classes, child), daemon=True
            )
            consumer.start()
            child.close()  # so a consumer that dies ends parent.recv() with EOFError
            pipes.append(parent)
            consumers.append(consumer)
        # Warm-up: the start is a burst (600 snapshots, and every frame published until pacing has
        # widened), which the consumer takes seconds to work through; what is measured is the
        # overload after it, from the first second whose arrivals are under WARM_DELAY_MS late.
        # A gateway that never catches up is measured all the same, from WARM_UP_TIMEOUT on, and
        # the result says so (`warm_up_s` None): a bench that fails writes no figures at all.
        warm_from = time.monotonic()
        pipes[0].send("warm")
        steady = pipes[0].poll(WARM_UP_TIMEOUT) and pipes[0].recv() == "steady"
        warmed_s = round(time.monotonic() - warm_from, 1) if steady else None
        if not steady:
            print(f"bench (e): market events still over {WARM_DELAY_MS} ms late {WARM_UP_TIMEOUT:.0f} s after"
                  " the start; measuring anyway", file=sys.stderr)  # fmt: skip
        status_before, sent_before = bg.gateway_status(), sim_sent(control)
        before = status_before["counters"]
        for parent in pipes:
            parent.send("measure")
        # CPU of every process on the path: whether the machine had a core to spare at this rate.
        parts = {
            "simulator": [simulator.pid],
            "consumers": [consumer.pid for consumer in consumers],
            "rabbitmq": bg.pids_named("beam.smp"),
            "redis": bg.pids_named("redis-server"),
        }
        cpu_before = {name: bg.cpu_of(pids) for name, pids in parts.items()}
        cpu0, _ = bg.proc_stats(gateway.pid)
        stop, orders = threading.Event(), []
        emitter = threading.Thread(target=emit_orders, args=(control, stop, 20.0, orders))
        t0 = time.monotonic()
        emitter.start()
        handoff, in_flight = [], []
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            status = bg.gateway_status()
            handoff.append(status["handoff_depth"])
            in_flight.append(status["in_flight"])
        backlog = broker_backlog()
        stop.set()
        emitter.join()
        for parent in pipes:
            parent.send("stop")
        elapsed = time.monotonic() - t0
        cpu1, rss = bg.proc_stats(gateway.pid)
        cpu_used = {name: bg.cpu_of(pids) - cpu_before[name] for name, pids in parts.items()}
        cpu_used["gateway"] = cpu1 - cpu0
        status_after = bg.gateway_status()
        after = status_after["counters"]
        # The market feed stops (a simulator stall), then what it sent is read and the consumer drains.
        requests.post(f"{control}/control/faults/stall", json={"seconds": 60}, timeout=10).raise_for_status()
        sent = sim_sent(control)
        tally, private_tally = (tally_of(parent) for parent in pipes)
        for consumer in consumers:
            consumer.join(10)
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(15)
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(15)
    finally:
        for process in (simulator, gateway):
            if process.poll() is None:
                process.kill()
    market_sent = sum(n - sent_before.get(key, 0) for key, n in sent.items() if not key.startswith("private:"))
    trades_sent = {key.split(":", 1)[1]: n for key, n in sent.items() if ":publicTrade." in key}
    trades_lost = sum(max(0, n - tally["trade_messages"].get(topic, 0)) for topic, n in trades_sent.items())
    lat = {
        **tally["latencies"],
        "order": private_tally["latencies"]["order"],
        "private_read_lag": private_tally["latencies"]["private_read_lag"],
    }
    market_lat = lat["orderbook"] + lat["ticker"] + lat["trade"]
    return {
        "offered_per_s": round(market_sent / elapsed),
        "target_per_s": round(events_per_s),
        "seconds": round(elapsed, 1),
        "delivered_per_s": round(len(market_lat) / elapsed),
        "p50_ms": round(statistics.median(market_lat), 1) if market_lat else None,
        "p99_ms": percentile(market_lat, 0.99),
        "book_p99_ms": percentile(lat["orderbook"], 0.99),
        "ticker_p99_ms": percentile(lat["ticker"], 0.99),
        "trade_p99_ms": percentile(lat["trade"], 0.99),
        "read_lag_p50_ms": percentile(lat["read_lag"], 0.5),
        "read_lag_p99_ms": percentile(lat["read_lag"], 0.99),
        "after_read_p99_ms": percentile(lat["after_read"], 0.99),
        "private_p99_ms": percentile(lat["order"], 0.99),
        "private_read_lag_p99_ms": percentile(lat["private_read_lag"], 0.99),
        "private_max_ms": round(max(lat["order"]), 1) if lat["order"] else None,
        "orders_sent": len(orders),
        "orders_received": private_tally["orders"],
        "order_repeats": private_tally["order_repeats"],
        "orders_from_rest": private_tally["orders_from_rest"],
        "trade_messages_sent": sum(trades_sent.values()),
        "trades_lost": trades_lost,
        "trade_seq_holes": tally["trade_seq_holes"],
        "books": tally["books"],
        "books_inconsistent": tally["books_inconsistent"],
        "book_gaps": tally["gaps"],
        "books_crossed": tally["crossed"],
        "conflated_received": tally["conflated"],
        "conflated": after.get("conflated", 0) - before.get("conflated", 0),
        # Books resynced because the gateway was far behind, and their deltas skipped meanwhile.
        "resyncs": after.get("resyncs_behind", 0) - before.get("resyncs_behind", 0),
        "skipped_resyncing": after.get("skipped_resyncing", 0) - before.get("skipped_resyncing", 0),
        "dropped": after["dropped"] - before["dropped"],
        "read_pauses": status_after["read_pauses"] - status_before["read_pauses"],
        "cpu_us_per_frame_in": round((cpu1 - cpu0) / max(1, after["frames_in"] - before["frames_in"]) * 1e6, 1),
        "rss_mb": round(rss, 1),
        "cores_busy": {name: round(used / elapsed, 2) for name, used in cpu_used.items()},
        "cores_busy_total": round(sum(cpu_used.values()) / elapsed, 2),
        "handoff_depth_max": max(handoff),
        "handoff_depth_median": statistics.median(handoff),
        "in_flight_median": statistics.median(in_flight),
        "broker_backlog_at_end": backlog,
        "read_lag_max_by_second": tally["lag_by_second"],
        "warm_up_s": warmed_s,
        "delay_max_by_second": tally["delay_by_second"],
        # Where each class's p99 comes from: its read lag and what came after the read, p99 each.
        "by_class": {
            cls: {part: percentile(lat.get(f"{cls}:{part}", []), 0.99) for part in ("read_lag", "after_read")}
            for cls in CLASSES[:3]
        },
    }


if __name__ == "__main__":
    import os

    os.environ.update(bg.env())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsgateway.settings")
    import django

    django.setup()
    print(run(float(sys.argv[1]) if len(sys.argv) > 1 else 16_000, float(sys.argv[2]) if len(sys.argv) > 2 else 20))
