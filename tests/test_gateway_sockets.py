"""Each Bybit socket recovers on its own: refused auth, a market backlog, a failing endpoint, unanswered requests."""

from __future__ import annotations

import time
from urllib.parse import quote, urlsplit

import pytest

from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import QueueReader, close_publisher_connections, management_api, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def status_of(subscription: Subscription) -> str:
    subscription.refresh_from_db()
    return subscription.status


def socket_status(runner, category: str) -> dict:
    (sock,) = [s for s in runner.gateway.status()["sockets"] if s["category"] == category]
    return sock


def auths(simulator) -> list[dict]:
    return [r for r in simulator.requests if r.get("op") == "auth"]


def test_refused_auth_keeps_private_rows_live_and_retries_until_accepted(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    gateway_settings.GATEWAY_AUTH_RETRY_CAP = 0.3
    simulator.call(simulator.sim.reject_auth(True))
    runner = start_gateway()
    order, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: len(auths(simulator)) >= 3, message="auth tried again with backoff")
    assert status_of(order) == "pending"  # still wanted: not failed for good
    sock = socket_status(runner, "private")
    assert sock["auth_error"] == "API key is invalid."
    assert sock["auth_failures"] >= 3 and sock["auth_failing_since"] <= time.time()

    simulator.call(simulator.sim.reject_auth(False))
    wait_for(lambda: status_of(order) == "active", message="the row active once Bybit accepts the key")
    sock = socket_status(runner, "private")
    assert (sock["auth_error"], sock["auth_failing_since"]) == ("", None)
    reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    sent = simulator.call(simulator.sim.emit_order(symbol="ETHUSDT"))
    reader.wait(lambda m: len(m) == 1, message="the order emitted after the recovery")
    assert reader.messages[0]["data"] == sent["data"][0]
    reader.close()


def set_connection_limit(rabbit: str, limit: int | None) -> None:
    """Refuse (0) or allow (None) new AMQP connections to the test vhost; open ones stay."""
    path = f"/vhost-limits/{quote(urlsplit(rabbit).path[1:], safe='')}/max-connections"
    if limit is None:
        management_api(path, "DELETE").raise_for_status()
    else:
        management_api(path, "PUT", json={"value": limit}).raise_for_status()


def test_private_socket_keeps_reading_while_the_market_hand_off_is_backlogged(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    gateway_settings.GATEWAY_BACKPRESSURE_AT = 5
    gateway_settings.GATEWAY_MAX_READ_PAUSE = 30.0
    gateway_settings.GATEWAY_HANDOFF_SIZE = 100_000
    gateway_settings.GATEWAY_DEAD_AFTER = 10.0  # a paused reader is not declared dead during the test
    runner = start_gateway()
    book, _ = subscription_create(service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT",
                                  depth=1)  # fmt: skip
    order, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: status_of(book) == "active" and status_of(order) == "active", message="both active")
    reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    set_connection_limit(rabbit, 0)
    try:
        # RabbitMQ refuses the publisher's reconnect: market events pile up in the hand-off.
        wait_for(lambda: close_publisher_connections(rabbit) > 0, message="the publisher connection closed")
        wait_for(lambda: runner.gateway.handoff.backlogged(), message="the market hand-off backlogged")
        backlogged_at = time.time()
        wait_for(lambda: socket_status(runner, "private")["last_frame_at"] > backlogged_at,
                 message="a private frame (a pong) read during the backlog")  # fmt: skip
        sent = simulator.call(simulator.sim.emit_order(symbol="SOLUSDT"))
        emitted_at = time.time()
        wait_for(lambda: socket_status(runner, "private")["last_frame_at"] > emitted_at + 1.0, timeout=3,
                 message="the private socket still reading a second into the backlog")  # fmt: skip
        assert runner.gateway.handoff.backlogged()  # the market backlog was there all along
    finally:
        set_connection_limit(rabbit, None)
    reader.wait(lambda m: len(m) == 1, timeout=15, message="the order once RabbitMQ takes connections again")
    assert reader.messages[0]["data"] == sent["data"][0]
    assert socket_status(runner, "private")["reconnects"] == 0
    reader.close()


def test_a_refused_public_endpoint_does_not_hold_up_the_private_socket(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    gateway_settings.GATEWAY_CIRCUIT_FAILURES = 2
    gateway_settings.GATEWAY_CIRCUIT_COOLDOWN = 30.0
    runner = start_gateway()
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    order, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: status_of(trades) == "active" and status_of(order) == "active", message="both active")
    linear_url = f"{simulator.url}/v5/public/linear"
    simulator.call(simulator.sim.refuse(60, "/v5/public/linear"))
    simulator.call(simulator.sim.drop_connections())
    wait_for(lambda: runner.gateway.status()["circuit"]["state"] == "open", message="the linear circuit open")
    wait_for(lambda: socket_status(runner, "private")["state"] == "connected", message="the private socket back")
    dropped_at = time.time()
    assert simulator.call(simulator.sim.drop_connections()) == 1  # only the private socket is connected
    wait_for(lambda: (socket_status(runner, "private")["last_outage"] or {}).get("from", 0) >= dropped_at,
             timeout=3, message="the private socket reconnected within its own backoff")  # fmt: skip
    circuits = runner.gateway.status()["circuits"]
    assert circuits[linear_url]["state"] == "open"
    assert circuits[f"{simulator.url}/v5/private"]["state"] == "closed"
    reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    sent = simulator.call(simulator.sim.emit_order(symbol="ETHUSDT"))
    reader.wait(lambda m: len(m) == 1, message="the order while the linear endpoint is refused")
    assert reader.messages[0]["data"] == sent["data"][0]
    reader.close()


def test_an_unanswered_subscribe_is_sent_again_and_goes_live_without_a_restart(
    start_gateway, gateway_settings, simulator
) -> None:
    gateway_settings.GATEWAY_REPLY_TIMEOUT = 0.2
    runner = start_gateway()
    simulator.call(simulator.sim.control.ignore_requests(2.0))
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    wait_for(lambda: status_of(trades) == "active", timeout=8, message="the row active after the fault")
    sent = [r for r in simulator.requests if r.get("op") == "subscribe" and r["category"] == "linear"]
    assert len(sent) >= 3  # sent again while unanswered
    # Still unanswered after the retries: the socket was given up and replaced, and says why.
    sock = socket_status(runner, "linear")
    assert sock["reconnects"] >= 1 and "no reply" in sock["last_error"]
