"""Benchmarks (b)-(d) of the gateway: simulator -> run_gateway -> RabbitMQ -> a consumer process.

Each part runs real processes against the bench's own database (`wsgateway_bench`), vhost
(`wsgateway-bench`) and Redis prefix, so a developer's running services are not disturbed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
import redis
import requests

from tests.bench_consumer import consume

ROOT = Path(__file__).resolve().parent.parent
VHOST = "wsgateway-bench"
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
DB_NAME = "wsgateway_bench"
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"
PREFIX = "wsgateway-bench:"
SERVICE = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SECRET_KEY": "bench-only",
        "DATABASE_URL": DATABASE_URL,
        "RABBITMQ_URL": AMQP_URL,
        "REDIS_KEY_PREFIX": PREFIX,
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
        **extra,
    }


def prepare() -> None:
    """A fresh bench database, vhost and prefix."""
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env(), check=True)
    api = "http://127.0.0.1:15672/api"
    requests.delete(f"{api}/vhosts/{quote(VHOST, safe='')}", auth=("guest", "guest"), timeout=10)
    requests.put(f"{api}/vhosts/{quote(VHOST, safe='')}", auth=("guest", "guest"), timeout=10).raise_for_status()
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    permissions = f"{api}/permissions/{quote(VHOST, safe='')}/guest"
    requests.put(permissions, json=everything, auth=("guest", "guest"), timeout=10).raise_for_status()
    client = redis.Redis()
    for key in client.scan_iter(match=PREFIX + "*"):
        client.delete(key)


def subscribe(symbols: int, depth: int = 50) -> None:
    """`symbols` order-book subscriptions of the bench service, written straight to the database."""
    from subscriptions import topics

    rows = []
    for i in range(1, symbols + 1):
        topic = topics.resolve("orderbook", "linear", f"SYM{i:04d}USDT", depth)
        rows.append((SERVICE, "orderbook", "linear", topic.symbol, depth, "", "orderbook", topic.bybit_topic,
                     topic.routing_key, topic.queue_name(SERVICE), "pending", ""))  # fmt: skip
    insert_subscriptions(rows)


def insert_subscriptions(rows: list[tuple]) -> None:
    """Replace the bench database's subscriptions with `rows`, written straight to the table (no nudge)."""
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}", autocommit=True) as conn:
        conn.execute("DELETE FROM subscriptions_subscription")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO subscriptions_subscription (id, service_name, channel, category, symbol, depth, interval,"
                " event_class, bybit_topic, routing_key, queue_name, status, error, created_at, updated_at)"
                " VALUES (gen_random_uuid(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now(), now())",
                rows,
            )


def start(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process writing to it
    return subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=env(**(extra_env or {})), stderr=log)


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def gateway_status() -> dict[str, Any]:
    raw = redis.Redis().get(f"{PREFIX}gateway:status")
    return orjson.loads(raw) if raw else {}


def wait_live(topics: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sockets = gateway_status().get("sockets", [])
        if sum(s["topics"] for s in sockets) >= topics:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the gateway did not subscribe {topics} topics: {gateway_status().get('sockets')}")


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds used, peak RSS in MB) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return cpu, peak / 1024


def pids_named(command: str) -> list[int]:
    """Processes whose command name is `command` (beam.smp is RabbitMQ's Erlang VM), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_stats(pid)[0]
        except (OSError, StopIteration):
            pass
    return total


def run_path(symbols: int, rate: str, seconds: float, gateway_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Simulator -> gateway -> RabbitMQ -> consumer for `seconds`; returns rates, losses, latencies, CPU, RSS."""
    prepare()
    subscribe(symbols)
    sim_port = free_port()
    simulator = start(["bybit_simulator", "--port", str(sim_port), "--control-port", str(free_port()), "--rate", rate,
                       "--symbols", str(max(symbols, 1))])  # fmt: skip
    wait_port(sim_port)
    gateway = start(
        ["run_gateway"],
        {"BYBIT_WS_URL": f"ws://127.0.0.1:{sim_port}", "QUEUE_MAX_LENGTH_ORDERBOOK": "0", **(gateway_env or {})},
    )
    consumer = None
    try:
        wait_live(symbols)
        parent, child = multiprocessing.Pipe()
        consumer = multiprocessing.get_context("spawn").Process(
            target=consume, args=(AMQP_URL, f"ws-gateway.{SERVICE}.orderbook", child)
        )
        consumer.start()
        time.sleep(3.0)  # warm-up: sockets subscribed, snapshots through, backlog drained
        parent.send("measure")
        before = gateway_status()["counters"]
        # CPU of every process on the path, to show where the machine's two cores go.
        parts = {
            "simulator": [simulator.pid],
            "consumer": [consumer.pid],
            "rabbitmq": pids_named("beam.smp"),
            "redis": pids_named("redis-server"),
        }
        cpu_before = {name: cpu_of(pids) for name, pids in parts.items()}
        cpu0, _ = proc_stats(gateway.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        after = gateway_status()["counters"]
        cpu1, rss = proc_stats(gateway.pid)
        cpu_used = {name: cpu_of(pids) - cpu_before[name] for name, pids in parts.items()}
        cpu_used["gateway"] = cpu1 - cpu0
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(60)  # under overload it first writes out what it has queued for the gateway
        gateway.send_signal(signal.SIGTERM)
        exit_code = gateway.wait(15)
        final = gateway_status()["counters"]
        parent.send("stop")
        tally = parent.recv()
        consumer.join(10)
    finally:
        for process in (simulator, gateway):
            if process.poll() is None:
                process.kill()
        if consumer is not None and consumer.is_alive():  # a failed run must not leave it reading forever
            consumer.kill()
    confirmed = after["confirmed"] - before["confirmed"]
    latencies = sorted(tally["latencies_ms"])
    read_lags = sorted(tally["read_lags_ms"])
    return {
        "gateway_per_s": round(confirmed / elapsed),
        "frames_in_per_s": round((after["frames_in"] - before["frames_in"]) / elapsed),
        "events": final["events"],
        "confirmed": final["confirmed"],
        "dropped": final["dropped"],
        "received_unique": tally["unique"],
        # Every event the gateway read is either delivered or counted as dropped by policy.
        "lost": final["events"] - final["dropped"] - tally["unique"],
        "gaps_seen": tally["gaps"],
        "duplicates": tally["duplicates"],
        "exit_code": exit_code,
        "cpu_us_per_event": round((cpu1 - cpu0) / max(1, after["events"] - before["events"]) * 1e6, 1),
        "rss_mb": round(rss, 1),
        "latency_p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2) if latencies else None,
        "latency_max_ms": round(latencies[-1], 2) if latencies else None,
        "read_lag_p99_ms": round(read_lags[int(len(read_lags) * 0.99) - 1], 2) if read_lags else None,
        "consumer_received": tally["received"],
        # Cores busy over the measured window, per process and in all (this machine has os.cpu_count()).
        "cores_busy": {name: round(used / elapsed, 2) for name, used in cpu_used.items()},
        "cores_busy_total": round(sum(cpu_used.values()) / elapsed, 2),
        "broker_cpu_us_per_event": round(cpu_used["rabbitmq"] / max(1, confirmed) * 1e6, 1),
    }


def run(seconds: float = 10.0) -> dict[str, Any]:
    full = run_path(200, "max", seconds)
    # 40 books at Bybit's 20 ms cadence: 2,000 events/s.
    paced = run_path(40, "1", seconds)
    memory = run_path(500, "0.2", seconds)  # 500 books at a fifth of Bybit's cadence: 5,000 events/s
    return {"full": full, "latency": paced, "memory": memory}


if __name__ == "__main__":
    os.environ.update(env())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsgateway.settings")
    import django

    django.setup()
    which = sys.argv[1] if len(sys.argv) > 1 else "full"
    if which == "full":
        print(run_path(200, "max", 10))
    elif which == "latency":
        print(run_path(40, "1", 10))
    else:
        print(run_path(500, "0.2", 10))
