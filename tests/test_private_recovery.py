"""No private event is lost across deploys, failovers and reconnects: the simulator's ledger is the judge.

Each scenario runs real `manage.py run_gateway` processes against the simulator, RabbitMQ,
Redis and PostgreSQL while a writer thread emits orders, executions and positions. After the
fault, whatever a consumer read from its queues is compared with the simulator's own record of
every private item it emitted (`Simulator.private.ledger`), never with the gateway's counters:
every execution delivered, every order's and position's last state delivered, and a duplicate
only ever under the id of its first copy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings

from subscriptions.services import subscription_create
from tests.conftest import (
    SIMULATOR_CREDENTIALS,
    TIMEOUT_FACTOR,
    QueueReader,
    SimulatorThread,
    close_publisher_connections,
    wait_for,
)
from tests.test_gateway_sockets import set_connection_limit

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
LOCK_TTL = 1.5
CLASSES = ("order", "execution", "position")


@pytest.fixture
def ledger_simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(credentials=dict([SIMULATOR_CREDENTIALS]), ping_timeout=30.0)
    yield sim
    sim.close()


@pytest.fixture
def spawn(rabbit: str, redis_prefix: str, ledger_simulator: SimulatorThread) -> Iterator:
    """Start `manage.py run_gateway` processes on the test database, vhost, prefix and simulator (WS and REST)."""
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SECRET_KEY": "test-only",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "RABBITMQ_URL": rabbit,
        "REDIS_KEY_PREFIX": redis_prefix,
        "BYBIT_WS_URL": ledger_simulator.url,
        "BYBIT_REST_URL": ledger_simulator.rest_url,
        "BYBIT_API_KEY": SIMULATOR_CREDENTIALS[0],
        "BYBIT_API_SECRET": SIMULATOR_CREDENTIALS[1],
        "GATEWAY_RECONCILE_INTERVAL": "0.3",
        "GATEWAY_LOCK_TTL": str(LOCK_TTL),
        "GATEWAY_STATUS_INTERVAL": "0.2",
        "GATEWAY_BACKOFF_BASE": "0.05",
        "GATEWAY_BACKOFF_CAP": "0.5",
        "GATEWAY_PING_INTERVAL": "0.5",
        "GATEWAY_DEAD_AFTER": "2.0",
        "LOG_FORMAT": "json",
    }
    processes: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "run_gateway"],
            cwd=ROOT,
            env=env,
            stderr=tempfile.TemporaryFile(),  # noqa: SIM115 - a pipe nobody reads would block the gateway
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def lock_holder(prefix: str) -> str:
    client = redis.Redis.from_url(settings.REDIS_URL)
    value = client.get(f"{prefix}gateway:lock")
    client.close()
    return value.decode() if value else ""


def subscribe_private() -> None:
    for channel in CLASSES:
        subscription, _ = subscription_create(service_name="desk", channel=channel)
        wait_for(
            lambda s=subscription: (s.refresh_from_db() or s.status) == "active",
            timeout=15,
            message=f"the {channel} subscription to go live",
        )


class Writer:
    """Emits a steady stream of private events on the simulator until stopped: the desk trading."""

    def __init__(self, sim: SimulatorThread, per_second: float = 60.0) -> None:
        self.sim = sim
        self.interval = 1.0 / per_second
        self.stopping = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self.run, name="writer", daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            order_id = f"desk-{n // 3}"  # each order: New, PartiallyFilled, Filled
            status = ("New", "PartiallyFilled", "Filled")[n % 3]
            self.sim.call(self.sim.sim.emit_order(orderId=order_id, orderStatus=status))
            if status != "New":
                self.sim.call(self.sim.sim.emit_execution(orderId=order_id, execId=f"{order_id}-{status}"))
                self.sim.call(self.sim.sim.emit_position(symbol="BTCUSDT", size=str(n)))
            self.count += 1
            self.stopping.wait(self.interval)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)


class Desk:
    """The consuming service: reads its three private queues."""

    def __init__(self, url: str) -> None:
        self.readers = {c: QueueReader(url, f"ws-gateway.desk.{c}") for c in CLASSES}

    def drain(self) -> None:
        for reader in self.readers.values():
            reader.drain(0.2)

    def events(self, event_class: str) -> list[dict]:
        return [m for m in self.readers[event_class].messages if m.get("type") != "resync"]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def missing(sim: SimulatorThread, desk: Desk) -> dict[str, list]:
    """What the ledger says was emitted and no consumer has: the loss, by class."""
    ledger = sim.sim.private.ledger
    desk.drain()
    got_execs = {m["data"].get("execId") for m in desk.events("execution")}
    got_orders = {(m["data"].get("orderId"), m["data"].get("updatedTime")) for m in desk.events("order")}
    got_positions = {(m["data"].get("symbol"), m["data"].get("seq")) for m in desk.events("position")}
    last_order: dict[str, dict] = {}
    last_position: dict[tuple, dict] = {}
    execs = []
    for entry in ledger:
        item = entry["item"]
        if entry["topic"] == "order":
            last_order[item["orderId"]] = item
        elif entry["topic"] == "position":
            last_position[(item["category"], item["symbol"], item["positionIdx"])] = item
        elif entry["topic"] == "execution":
            execs.append(item["execId"])
    return {
        "execution": [e for e in execs if e not in got_execs],
        "order": [o["orderId"] for o in last_order.values() if (o["orderId"], o["updatedTime"]) not in got_orders],
        "position": [k for k, p in last_position.items() if (p["symbol"], p["seq"]) not in got_positions],
    }


def assert_duplicates_share_ids(desk: Desk) -> dict[str, int]:
    """Every copy of one Bybit event carries one id, so a consumer can drop repeats; return repeats per class."""
    repeats = {}
    for event_class in CLASSES:
        by_content: dict[str, set[str]] = {}
        ids = [m["id"] for m in desk.events(event_class)]
        for message in desk.events(event_class):
            data = message["data"]
            content = {
                "order": lambda d: f"{d.get('orderId')}:{d.get('updatedTime')}:{d.get('orderStatus')}",
                "execution": lambda d: str(d.get("execId")),
                "position": lambda d: f"{d.get('symbol')}:{d.get('positionIdx')}:{d.get('seq')}",
            }[event_class](data)
            by_content.setdefault(content, set()).add(message["id"])
        split = {k: v for k, v in by_content.items() if len(v) > 1}
        assert not split, f"one {event_class} event under several ids: {list(split.items())[:3]}"
        repeats[event_class] = len(ids) - len(set(ids))
    return repeats


def settle(sim: SimulatorThread, desk: Desk, timeout: float = 20.0) -> None:
    wait_for(lambda: not any(missing(sim, desk).values()), timeout=timeout, interval=0.2,
             message="every private event in the ledger to reach the desk")  # fmt: skip


def run_scenario(sim: SimulatorThread, rabbit: str, fault) -> dict:
    desk = Desk(rabbit)
    with Writer(sim) as writer:
        wait_for(lambda: writer.count >= 30, timeout=10, message="the desk trading")
        fault()
        wait_for(lambda: writer.count >= 200, timeout=30, message="more trading after the fault")
    try:
        settle(sim, desk)
    finally:
        lost = {k: len(v) for k, v in missing(sim, desk).items()}
        result = {"emitted": len(sim.sim.private.ledger), "lost": lost}
        print(f"\nrecovery scenario: {result}")  # the figures for the record (pytest -s)
    result["repeats"] = assert_duplicates_share_ids(desk)
    desk.close()
    print(f"recovery scenario repeats: {result['repeats']}")
    return result


def test_kill_9_failover_to_a_standby_loses_no_private_event(spawn, ledger_simulator, rabbit, redis_prefix) -> None:
    owner = spawn()
    wait_for(lambda: f":{owner.pid}:" in lock_holder(redis_prefix), timeout=15, message="the first gateway to own")
    standby = spawn()
    subscribe_private()

    def kill_owner() -> None:
        started = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        owner.wait(5)
        wait_for(lambda: f":{standby.pid}:" in lock_holder(redis_prefix), timeout=LOCK_TTL * 3,
                 message="the standby to take over")  # fmt: skip
        print(f"\nrecovery scenario takeover: {time.monotonic() - started:.2f} s from kill -9 to the standby's lock")

    result = run_scenario(ledger_simulator, rabbit, kill_owner)
    assert result["lost"] == {"execution": 0, "order": 0, "position": 0}, result


def test_sigterm_rolling_restart_loses_no_private_event(spawn, ledger_simulator, rabbit, redis_prefix) -> None:
    owner = spawn()
    wait_for(lambda: f":{owner.pid}:" in lock_holder(redis_prefix), timeout=15, message="the first gateway to own")
    standby = spawn()
    subscribe_private()

    def restart() -> None:
        started = time.monotonic()
        owner.send_signal(signal.SIGTERM)
        wait_for(lambda: f":{standby.pid}:" in lock_holder(redis_prefix), timeout=LOCK_TTL * 3 + 10,
                 message="the standby to take over")  # fmt: skip
        took_over = time.monotonic() - started
        assert owner.wait(10 * TIMEOUT_FACTOR) == 0
        print(f"\nrecovery scenario takeover: {took_over:.2f} s from SIGTERM to the standby's lock, "
              f"{time.monotonic() - started:.2f} s to the old owner's exit")  # fmt: skip
        spawn()  # the restarted instance becomes the new standby

    result = run_scenario(ledger_simulator, rabbit, restart)
    assert result["lost"] == {"execution": 0, "order": 0, "position": 0}, result


@pytest.mark.parametrize("abrupt", [False, True], ids=["clean", "abrupt"])
def test_a_dropped_private_socket_loses_no_private_event(spawn, ledger_simulator, rabbit, abrupt: bool) -> None:
    spawn()
    subscribe_private()

    def drop() -> None:
        for _ in range(3):
            ledger_simulator.call(ledger_simulator.sim.drop_connections(abrupt=abrupt))
            time.sleep(0.3)  # a burst of drops, spaced like a flapping network: not a wait for a condition

    result = run_scenario(ledger_simulator, rabbit, drop)
    assert result["lost"] == {"execution": 0, "order": 0, "position": 0}, result


def test_a_stalled_private_socket_loses_no_private_event(spawn, ledger_simulator, rabbit) -> None:
    spawn()
    subscribe_private()
    result = run_scenario(ledger_simulator, rabbit, lambda: ledger_simulator.call(ledger_simulator.sim.stall(3.0)))
    assert result["lost"] == {"execution": 0, "order": 0, "position": 0}, result


def test_a_broker_stall_during_handover_loses_no_private_event(spawn, ledger_simulator, rabbit, redis_prefix) -> None:
    """The owner cannot reach RabbitMQ when it is told to stop: it hands over anyway, and nothing is lost."""
    owner = spawn()
    wait_for(lambda: f":{owner.pid}:" in lock_holder(redis_prefix), timeout=15, message="the first gateway to own")
    standby = spawn()
    subscribe_private()

    def stall_then_hand_over() -> None:
        set_connection_limit(rabbit, 0)  # the broker takes no new connection: the owner's publisher cannot return
        try:
            wait_for(lambda: close_publisher_connections(rabbit) > 0, timeout=10, message="the publisher cut off")
            owner.send_signal(signal.SIGTERM)
            wait_for(lambda: f":{standby.pid}:" in lock_holder(redis_prefix), timeout=LOCK_TTL * 4,
                     message="the standby to take over while the owner still drains")  # fmt: skip
        finally:
            set_connection_limit(rabbit, None)
        owner.wait(15 * TIMEOUT_FACTOR)  # exit 1: it stopped with events it could not confirm

    result = run_scenario(ledger_simulator, rabbit, stall_then_hand_over)
    assert result["lost"] == {"execution": 0, "order": 0, "position": 0}, result


def test_a_reconnect_storm_stays_inside_bybits_rest_limits(spawn, ledger_simulator, rabbit) -> None:
    """Ten private reconnects in a row under tight limits: back-fills wait for the limit, none is refused."""
    tight = {path: 4 for path in ("/v5/order/realtime", "/v5/order/history", "/v5/execution/list",
                                  "/v5/position/list", "/v5/account/wallet-balance")}  # fmt: skip
    ledger_simulator.sim.rest.set_limits(tight, window=1.0)
    spawn()
    subscribe_private()

    def storm() -> None:
        for _ in range(10):
            ledger_simulator.call(ledger_simulator.sim.drop_connections(abrupt=True))
            time.sleep(0.2)  # a flapping link, not a wait for a condition

    result = run_scenario(ledger_simulator, rabbit, storm)
    assert result["lost"] == {"execution": 0, "order": 0, "position": 0}, result
    answered = ledger_simulator.sim.rest.answered
    refused = {key: n for key, n in answered.items() if key[1] in (10006, 10018, 403)}
    assert sum(answered.values()) > 0 and refused == {}, answered
