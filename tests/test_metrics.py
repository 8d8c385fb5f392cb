"""/metrics from the gateway's status record: what a Prometheus dashboard and alert rules read."""

from __future__ import annotations

import time

from streaming.monitoring.metrics import gateway_metrics


def samples(status: dict) -> dict[tuple[str, tuple], float]:
    families = gateway_metrics(status, time.time())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_each_endpoint_circuit_and_the_private_auth_refusals_are_exported() -> None:
    linear, private = "wss://stream.bybit.com/v5/public/linear", "wss://stream.bybit.com/v5/private"
    status = {
        "updated_at": time.time(),
        "circuit": {"state": "open", "endpoint": linear},
        "circuits": {linear: {"state": "open"}, private: {"state": "closed"}},
        "sockets": [
            {"name": "linear-1", "category": "linear", "state": "waiting_circuit", "reconnects": 3},
            {"name": "private-1", "category": "private", "state": "auth_failed", "auth_failures": 5},
        ],
    }
    found = samples(status)
    assert found[("wsgateway_gateway_circuit_open", ())] == 1  # the worst endpoint, as before
    assert found[("wsgateway_gateway_endpoint_circuit_open", (("endpoint", linear),))] == 1
    assert found[("wsgateway_gateway_endpoint_circuit_open", (("endpoint", private),))] == 0
    assert found[("wsgateway_gateway_socket_auth_failures_total", (("socket", "private-1"),))] == 5
    assert ("wsgateway_gateway_socket_auth_failures_total", (("socket", "linear-1"),)) not in found


def test_parked_private_events_and_a_failing_backfill_are_exported() -> None:
    queue = "ws-gateway.desk.order"
    status = {
        "updated_at": time.time(),
        "private": {"parked": {queue: 14}},
        "recovery": {"backfills": 7, "last_error": "BybitRestError: retCode 10016", "failing_since": time.time()},
    }
    found = samples(status)
    assert found[("wsgateway_gateway_private_parked", (("queue", queue),))] == 14
    assert found[("wsgateway_gateway_backfills_total", ())] == 7
    assert found[("wsgateway_gateway_backfill_failing", ())] == 1
    working = samples({**status, "private": {}, "recovery": {"backfills": 8, "last_error": None}})
    assert working[("wsgateway_gateway_backfill_failing", ())] == 0
    assert ("wsgateway_gateway_private_parked", (("queue", queue),)) not in working


def test_a_gateway_reading_late_and_its_pacing_interval_are_exported() -> None:
    found = samples({"updated_at": time.time(), "pacing": {"behind": True, "interval_ms": 400, "held": 9}})
    assert found[("wsgateway_gateway_reading_late", ())] == 1
    assert found[("wsgateway_gateway_pacing_interval_ms", ())] == 400
    assert samples({"updated_at": time.time()})[("wsgateway_gateway_reading_late", ())] == 0
