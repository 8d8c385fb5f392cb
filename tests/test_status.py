"""The gateway's counters: every malformed frame and quarantined item is counted, and none goes unlogged."""

from __future__ import annotations

import logging

import orjson
import pytest

from streaming.envelope import DataFrame, Envelopes, Malformed
from streaming.status import Counters
from wsgateway.logging import LogThrottle


def quarantining(frame: dict) -> DataFrame:
    result = Envelopes("r").handle(orjson.dumps(frame).decode(), "private")
    assert isinstance(result, DataFrame) and result.quarantined
    return result


def test_each_reason_gets_its_line_and_held_repeats_are_reported_when_their_window_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    counters = Counters()
    counters.throttle = LogThrottle(interval=10, clock=lambda: now[0])
    order = quarantining({"topic": "order", "data": [{"symbol": "BTCUSDT", "orderId": "1"}]})
    wallet = quarantining({"topic": "wallet", "data": [{"coin": []}]})
    with caplog.at_level(logging.WARNING, logger="streaming.status"):
        counters.count_quarantined(order, "private-1")
        counters.count_quarantined(wallet, "private-1")  # another reason in the same window: its own line
        counters.count_quarantined(wallet, "private-1")  # held
        counters.count_malformed(Malformed("invalid JSON"), "{", "linear-1")
        counters.count_malformed(Malformed("binary frame"), b"\x00", "linear-1")
        counters.report_suppressed()
        now[0] = 10.5
        counters.report_suppressed()  # no later wallet line came: the held one is reported now
    logs = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    lines = [(line["event"], line["reason"]) for line in logs]
    assert lines == [
        ("bybit.item_quarantined", "order item without category"),
        ("bybit.item_quarantined", "balance item without accountType"),
        ("bybit.malformed_frame", "invalid JSON"),
        ("bybit.malformed_frame", "binary frame"),
        ("bybit.lines_suppressed", "balance item without accountType"),
    ]
    assert logs[0]["topic"] == "order" and logs[0]["field"] == "category" and logs[0]["routing_key"] == "order.unknown"
    assert orjson.loads(logs[0]["sample"]) == {"symbol": "BTCUSDT", "orderId": "1"}
    assert logs[-1]["suppressed"] == 1
    assert counters.quarantined == 3
    assert dict(counters.quarantined_by_reason) == {
        "order item without category": 1,
        "balance item without accountType": 2,
    }
