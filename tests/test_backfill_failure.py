"""A back-fill that fails is loud (status record, /health, alert, metric), retried, and never stops the live stream."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from streaming.monitoring.checks import gateway_alerts
from subscriptions.services import subscription_create
from tests.conftest import QueueReader, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def streamed_order_ids(messages: list[dict]) -> set[str]:
    return {m["data"].get("orderId") for m in messages if m.get("type") != "resync" and m.get("source") != "rest"}


def test_a_failing_backfill_is_reported_and_the_stream_goes_on_until_it_works_again(
    start_gateway, simulator, rabbit, settings
) -> None:
    settings.BYBIT_REST_URL = simulator.rest_url
    runner = start_gateway()
    subscription, _ = subscription_create(service_name="desk", channel="order")
    wait_for(lambda: (subscription.refresh_from_db() or subscription.status) == "active", message="live")
    reader = QueueReader(rabbit, "ws-gateway.desk.order")
    reader.wait(lambda m: any(x.get("reason") == "snapshot" for x in m), message="the desk's first snapshot")

    simulator.sim.rest.fail("error", 100_000)  # Bybit's REST API answers every call with retCode 10016
    simulator.call(simulator.sim.drop_connections(abrupt=True))  # a gap: the back-fill runs, and fails

    def recovery() -> dict:
        return runner.gateway.status()["recovery"]

    wait_for(lambda: recovery()["last_error"], timeout=30, message="the failed back-fill in the status record")
    assert recovery()["last_error"].startswith("BybitRestError") and recovery()["failing_since"] is not None

    simulator.call(simulator.sim.emit_order(orderId="live-during-outage"))
    reader.wait(lambda m: "live-during-outage" in streamed_order_ids(m), message="the live stream going on")
    assert runner.thread.is_alive()

    def gateway_health() -> dict:
        return Client().get("/health").json()["checks"]["gateway"]

    wait_for(lambda: gateway_health()["status"] == "degraded", message="/health degraded")
    (problem,) = gateway_health()["problems"]
    assert "back-fill from Bybit's REST API failing" in problem and "10016" in problem
    alerts = gateway_alerts(runner.gateway.status(), time.time())
    assert [a.severity for a in alerts if a.name == "gateway.backfill_failed"] == ["critical"]

    simulator.sim.rest.fail("error", 0)  # Bybit answers again
    simulator.call(simulator.sim.drop_connections(abrupt=True))
    wait_for(lambda: recovery()["last_error"] is None, timeout=30, message="the next back-fill to succeed")
    wait_for(lambda: gateway_health()["status"] == "ok", message="/health ok again")
    assert "gateway.backfill_failed" not in {a.name for a in gateway_alerts(runner.gateway.status(), time.time())}
    reader.close()
