"""The gateway recovers from what Bybit and RabbitMQ do wrong, and counts what it could not use."""

from __future__ import annotations

import pytest

from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import QueueReader, SimulatorThread, close_publisher_connections, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def active(*subscriptions: Subscription) -> bool:
    for subscription in subscriptions:
        subscription.refresh_from_db()
    return all(s.status == "active" for s in subscriptions)


def subscribe_two() -> tuple[Subscription, Subscription]:
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    book, _ = subscription_create(
        service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=50
    )
    wait_for(lambda: active(trades, book), message="both subscriptions active")
    return trades, book


def socket_status(runner) -> dict:
    (sock,) = runner.gateway.status()["sockets"]
    return sock


@pytest.mark.parametrize("abrupt", [False, True], ids=["clean-close", "tcp-abort"])
def test_dropped_connection_is_resubscribed_once_per_topic(start_gateway, simulator, rabbit, abrupt: bool) -> None:
    runner = start_gateway()
    subscribe_two()
    reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
    reader.wait(lambda m: len(m) >= 5)
    assert simulator.call(simulator.sim.drop_connections(abrupt)) == 1
    wait_for(lambda: simulator.subscribes[("linear", "orderbook.50.BTCUSDT")] == 2, message="resubscribe")
    seen = len(reader.messages)
    reader.wait(lambda m: len(m) >= seen + 5, message="events after the reconnect")
    assert simulator.subscribes[("linear", "publicTrade.BTCUSDT")] == 2  # once per connection: no duplicates
    sock = socket_status(runner)
    assert sock["reconnects"] == 1 and sock["last_outage"]["seconds"] >= 0
    assert reader.messages[-1]["type"] in ("snapshot", "delta")
    reader.close()


def test_stalled_exchange_socket_is_declared_dead_and_replaced(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    gateway_settings.GATEWAY_DEAD_AFTER = 1.0
    runner = start_gateway()
    subscribe_two()
    simulator.call(simulator.sim.stall(2.5))
    wait_for(lambda: socket_status(runner)["reconnects"] >= 1, timeout=5, message="the dead socket replaced")
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 3, timeout=10, message="trades once the stall is over")
    reader.close()


def test_refused_connections_open_the_circuit_then_recover(start_gateway, gateway_settings, simulator) -> None:
    gateway_settings.GATEWAY_CIRCUIT_FAILURES = 3
    gateway_settings.GATEWAY_CIRCUIT_COOLDOWN = 1.0
    runner = start_gateway()
    subscribe_two()
    simulator.call(simulator.sim.refuse(2.0))
    simulator.call(simulator.sim.drop_connections())
    wait_for(lambda: runner.gateway.status()["circuit"]["state"] == "open", message="the circuit to open")
    status = runner.gateway.status()["circuit"]
    assert status["state"] == "open" and status["next_attempt_at"] is not None
    assert status["endpoint"] == f"{simulator.url}/v5/public/linear"
    wait_for(lambda: runner.gateway.status()["circuit"]["state"] == "closed"
             and socket_status(runner)["state"] == "connected",
             timeout=10, message="recovery after the exchange accepts again")  # fmt: skip
    # Backoff and the open circuit kept attempts few: no tight reconnect loop.
    assert simulator.stats()["refused"] <= 10


def test_malformed_frames_are_counted_and_the_stream_goes_on(start_gateway, simulator, rabbit) -> None:
    runner = start_gateway()
    subscribe_two()
    kinds = ["invalid_json", "binary", "invalid_utf8", "unknown_topic", "missing_fields", "wrong_types", "oversized"]
    for kind in kinds:
        simulator.call(simulator.sim.send_malformed(kind))
    wait_for(lambda: runner.gateway.counters.malformed >= len(kinds), message="every malformed frame counted")
    reasons = runner.gateway.status()["malformed_by_reason"]
    assert set(reasons) == {
        "invalid JSON", "binary frame", "invalid UTF-8", "unknown topic", "missing data", "topic is not a string",
        "oversized frame",
    }  # fmt: skip
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 3, message="trades still flowing")
    assert socket_status(runner)["reconnects"] == 0
    reader.close()


def test_rabbitmq_connection_closed_mid_stream_loses_no_event(start_gateway, gateway_settings, rabbit) -> None:
    fast = SimulatorThread(rate=5.0, ping_timeout=30.0)  # orderbook.1 at 500 messages/s
    gateway_settings.BYBIT_WS_URL = fast.url
    try:
        runner = start_gateway()
        book, _ = subscription_create(
            service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=1
        )
        wait_for(lambda: active(book))
        reader = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
        reader.wait(lambda m: len(m) >= 200, message="the stream under way")
        wait_for(lambda: close_publisher_connections(rabbit) > 0, timeout=10, message="the publisher connection closed")
        wait_for(lambda: runner.gateway.publisher.reconnects >= 1 and runner.gateway.publisher.connected)
        seen = len(reader.messages)
        reader.wait(lambda m: len(m) >= seen + 200, message="the stream after RabbitMQ came back")
        assert runner.stop() == 0
        reader.drain(1.0)
        updates = {m["u"] for m in reader.messages}
        assert updates == set(range(min(updates), max(updates) + 1)), "a gap in u: events were lost"
        assert max(updates) - min(updates) + 1 >= seen + 200
        reader.close()
    finally:
        fast.close()
