"""One bad private item never costs its siblings: they are delivered, it is quarantined, counted and alerted on."""

from __future__ import annotations

import time

import pytest

from streaming.monitoring.checks import gateway_alerts
from streaming.monitoring.metrics import gateway_metrics
from streaming.simulator.control import PARTLY_BAD_ORDERS, PARTLY_BAD_WALLET
from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import GatewayThread, QueueReader, wait_for
from wsgateway.health import check_gateway

pytestmark = pytest.mark.django_db(transaction=True)


def live(runner: GatewayThread, *subscriptions: Subscription) -> bool:
    for subscription in subscriptions:
        subscription.refresh_from_db()
        if subscription.status != "active":
            return False
    wanted = {s.bybit_topic for s in subscriptions}
    return any(s.category == "private" and wanted <= s.live for s in list(runner.gateway.sockets.values()))


def test_a_bad_order_is_quarantined_and_its_siblings_delivered(start_gateway, simulator, rabbit) -> None:
    runner = start_gateway()
    orders, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: live(runner, orders), message="the order stream live")
    reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    simulator.call(simulator.sim.send_malformed("order_without_category"))
    good_one, bad, good_two = PARTLY_BAD_ORDERS["data"]

    reader.wait(lambda m: len(m) >= 3, message="the two good orders and the quarantined one")
    routed = {m.properties["application_headers"]["routing_key"]: m for m in reader.raw}
    by_key = {key: body for key, body in zip(routed, reader.messages, strict=True)}
    assert set(by_key) == {"order.linear.BTCUSDT", "order.linear.ETHUSDT", "order.unknown"}
    assert by_key["order.linear.BTCUSDT"]["data"] == good_one
    assert by_key["order.linear.ETHUSDT"]["data"] == good_two
    quarantined = by_key["order.unknown"]
    assert quarantined["data"] == bad  # intact, for the service to decide
    assert quarantined["quarantine"] == {"reason": "order item without category", "field": "category"}
    assert routed["order.unknown"].properties["delivery_mode"] == 2  # persistent, like every private event

    status = runner.gateway.status()
    assert status["counters"]["quarantined"] == 1
    assert status["quarantined_by_reason"] == {"order item without category": 1}
    (alert,) = [a for a in gateway_alerts(status, time.time()) if a.name == "gateway.quarantined"]
    assert alert.severity == "warning" and alert.details["by_reason"] == {"order item without category": 1}
    samples = {s.name: s for m in gateway_metrics(status, time.time()) for s in m.samples}
    sample = samples["wsgateway_gateway_quarantined_total"]
    assert (sample.labels, sample.value) == ({"reason": "order item without category"}, 1)
    wait_for(lambda: check_gateway(2.0).get("quarantined_by_reason"), message="/health to show the quarantine")
    assert check_gateway(2.0)["counters"]["quarantined"] == 1
    reader.close()


def test_a_wallet_without_account_type_keeps_the_good_account_and_the_stream(start_gateway, simulator, rabbit) -> None:
    runner = start_gateway()
    wallet, _ = subscription_create(service_name="alpha", channel="balance")
    orders, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: live(runner, wallet, orders), message="the wallet and order streams live")
    balances = QueueReader(rabbit, "ws-gateway.alpha.balance")
    fills = QueueReader(rabbit, "ws-gateway.alpha.order")
    simulator.call(simulator.sim.send_malformed("order_without_category"))
    simulator.call(simulator.sim.send_malformed("wallet_without_account_type"))
    good, bad = PARTLY_BAD_WALLET["data"]

    balances.wait(lambda m: len(m) >= 2, message="the good account and the quarantined one")
    routed = zip(balances.raw, balances.messages, strict=True)
    assert {m.properties["application_headers"]["routing_key"]: body["data"] for m, body in routed} == {
        "balance.UNIFIED": good,
        "balance.unknown": bad,
    }
    sent = simulator.call(simulator.sim.emit_order(orderId="after"))
    fills.wait(lambda m: any(b["data"] == sent["data"][0] for b in m), message="the private socket still reading")
    reasons = runner.gateway.status()["quarantined_by_reason"]
    assert reasons == {"order item without category": 1, "balance item without accountType": 1}
    assert [s["reconnects"] for s in runner.gateway.status()["sockets"] if s["category"] == "private"] == [0]
    balances.close()
    fills.close()
