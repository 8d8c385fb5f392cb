"""The pure monitor checks: a queue reading or the gateway's status record -> the alerts an operator sees."""

from __future__ import annotations

from typing import Any

import pytest

from streaming.monitoring.checks import (
    GATEWAY_FAMILIES,
    dropped_estimate,
    fill_ratio,
    gateway_alerts,
    queue_alerts,
    unroutable_alerts,
    worst,
)
from streaming.monitoring.readings import QueueReading

QUEUE = "ws-gateway.alpha.trade"
NOW = 1_800_000_000.0


@pytest.fixture(autouse=True)
def thresholds(settings):
    """The documented defaults, whatever the environment says."""
    settings.MONITOR_BACKLOG_WARNING = 1_000
    settings.MONITOR_BACKLOG_CRITICAL = 10_000
    settings.MONITOR_RETENTION_WARNING = 0.80
    settings.MONITOR_RETENTION_CRITICAL = 0.95
    settings.MONITOR_SLOW_SAMPLES = 3
    settings.GATEWAY_STATUS_STALE_AFTER = 5.0


def reading(**figures: Any) -> QueueReading:
    """A management-API reading of QUEUE with one consumer and a 1,000,000-message limit, unless told otherwise."""
    return QueueReading(
        **{
            "queue": QUEUE,
            "service_name": "alpha",
            "event_class": "trade",
            "source": "management",
            "ready": 0,
            "unacked": 0,
            "consumers": 1,
            "max_length": 1_000_000,
            **figures,
        }
    )


def names(found: list) -> list[str]:
    return sorted(a.name for a in found)


def check(r: QueueReading, earlier_depths: list[int] | None = None) -> list:
    return queue_alerts(r, fill_ratio(r), earlier_depths or [])


@pytest.mark.parametrize(
    ("ready", "unacked", "expected"),
    [
        (999, 0, []),
        (1_000, 0, ["queue.backlog.warning"]),
        (600, 400, ["queue.backlog.warning"]),  # unacked messages count towards the backlog
        (9_999, 0, ["queue.backlog.warning"]),
        (10_000, 0, ["queue.backlog.critical"]),  # critical replaces warning, never both
    ],
)
def test_backlog_warns_at_1000_and_is_critical_at_10000(ready: int, unacked: int, expected: list[str]) -> None:
    assert names(check(reading(ready=ready, unacked=unacked))) == expected


def test_backlog_alert_names_the_queue_service_and_depth() -> None:
    (alert,) = check(reading(ready=1_500))
    assert (alert.subject, alert.severity) == (QUEUE, "warning")
    assert alert.details["service"] == "alpha" and alert.details["event_class"] == "trade"
    assert alert.details["depth"] == 1_500 and alert.details["consumers"] == 1


@pytest.mark.parametrize(
    ("ready", "expected"),
    [
        (79, []),
        (80, ["queue.retention.warning"]),
        (94, ["queue.retention.warning"]),
        (95, ["queue.retention.critical"]),
        (100, ["queue.retention.critical"]),
    ],
)
def test_fill_warns_at_80_percent_and_is_critical_at_95(ready: int, expected: list[str]) -> None:
    found = check(reading(ready=ready, max_length=100))
    assert names(found) == expected
    assert all(a.details["fill"] == ready / 100 for a in found)


def test_fill_counts_the_byte_limit_when_it_is_the_closer_one() -> None:
    byte_bound = reading(ready=10, max_length=100, bytes=960, max_bytes=1_000)
    assert fill_ratio(byte_bound) == 0.96
    assert names(check(byte_bound)) == ["queue.retention.critical"]


def test_a_queue_without_a_limit_has_no_fill_and_no_retention_alert() -> None:
    unlimited = reading(ready=500, max_length=None)
    assert fill_ratio(unlimited) is None
    assert check(unlimited) == []


def test_messages_without_a_consumer_warn_but_an_empty_unread_queue_does_not() -> None:
    assert names(check(reading(ready=1, consumers=0))) == ["queue.no_consumer"]
    assert check(reading(ready=0, consumers=0)) == []


def test_depth_growing_at_each_recent_sample_flags_a_slow_consumer() -> None:
    found = check(reading(ready=400), earlier_depths=[300, 200, 100])  # newest first
    assert names(found) == ["queue.slow_consumer"]
    assert found[0].severity == "warning"


@pytest.mark.parametrize(
    ("earlier_depths", "why"),
    [
        ([400, 200, 100], "flat since the last sample"),
        ([300, 350, 100], "shrank once in between"),
        ([300, 200], "fewer samples than MONITOR_SLOW_SAMPLES"),
        ([], "no history yet"),
    ],
)
def test_depth_that_did_not_grow_every_time_is_not_slow(earlier_depths: list[int], why: str) -> None:
    assert check(reading(ready=400), earlier_depths) == [], why


def test_a_growing_queue_with_no_consumer_is_reported_as_unread_not_slow() -> None:
    assert names(check(reading(ready=400, consumers=0), [300, 200, 100])) == ["queue.no_consumer"]


def test_one_reading_can_raise_backlog_retention_and_no_consumer_together() -> None:
    found = check(reading(ready=12_000, consumers=0, max_length=12_000))
    assert names(found) == ["queue.backlog.critical", "queue.no_consumer", "queue.retention.critical"]
    assert worst(found) == "critical"


def test_worst_severity_is_the_status_a_sample_shows() -> None:
    assert worst([]) == "ok"
    assert worst(check(reading(ready=1, consumers=0))) == "warning"
    assert worst(check(reading(ready=1_000, consumers=0, max_length=1_000))) == "critical"


def test_a_full_queue_has_dropped_what_was_published_and_neither_delivered_nor_kept() -> None:
    assert dropped_estimate(reading(ready=100, max_length=100, published=127, delivered=0)) == 27
    assert dropped_estimate(reading(ready=96, max_length=100, published=127, delivered=0)) == 31  # figures lag
    assert dropped_estimate(reading(ready=5, max_length=5, published=50, delivered=45)) == 0
    # A passive declare has no counters: unknown, not zero.
    assert dropped_estimate(reading(source="declare", ready=100, unacked=None)) is None


def test_a_queue_far_from_full_drops_nothing_however_its_counters_lag() -> None:
    """Seen live: 5% full, the deliver counter a second behind the publish counter, "238 dropped"."""
    lagging = reading(ready=50, max_length=1_000, published=10_238, delivered=9_950)
    assert dropped_estimate(lagging) == 0
    # Drops counted while it was full stand: below the limit the count cannot grow.
    assert dropped_estimate(lagging, previous=27) == 27


def test_a_queue_with_a_message_ttl_can_drop_at_any_fill() -> None:
    expiring = reading(ready=10, max_length=1_000, message_ttl=60_000, published=500, delivered=400)
    assert dropped_estimate(expiring) == 90


def test_a_byte_limit_counts_as_full_too() -> None:
    by_bytes = reading(ready=10, max_length=None, bytes=990, max_bytes=1_000, published=40, delivered=20)
    assert dropped_estimate(by_bytes) == 10


def status(**fields: Any) -> dict[str, Any]:
    """A running gateway's status record, written just now, with one connected socket."""
    socket = {"name": "linear-1", "category": "linear", "state": "connected", "last_error": "", "reconnects": 0}
    return {
        "updated_at": NOW - 1,
        "state": "running",
        "circuit": {"state": "closed", "next_attempt_at": None},
        "sockets": [socket],
        "publisher": {"connected": True, "last_error": ""},
        **fields,
    }


def test_a_healthy_gateway_raises_nothing() -> None:
    assert gateway_alerts(status(), NOW) == []


def test_a_missing_status_record_is_a_stale_gateway() -> None:
    (alert,) = gateway_alerts(None, NOW)
    assert (alert.name, alert.subject, alert.severity) == ("gateway.status.stale", "gateway", "critical")
    assert alert.details == {"reason": "no status record"}


def test_a_status_older_than_the_limit_is_stale_and_hides_everything_else() -> None:
    old = status(updated_at=NOW - 6.5, sockets=[{"name": "linear-1", "state": "reconnecting"}])
    (alert,) = gateway_alerts(old, NOW)
    assert (alert.name, alert.details) == ("gateway.status.stale", {"age_s": 6.5})
    assert gateway_alerts(status(updated_at=NOW - 5.0), NOW) == []


def test_a_socket_that_is_not_connected_is_down_under_its_own_name() -> None:
    down = {"name": "spot-2", "category": "spot", "state": "reconnecting", "last_error": "EOF", "reconnects": 3}
    found = gateway_alerts(status(sockets=[status()["sockets"][0], down]), NOW)
    assert [(a.name, a.subject, a.severity) for a in found] == [("gateway.socket.down", "spot-2", "critical")]
    assert found[0].details == {"state": "reconnecting", "category": "spot", "last_error": "EOF", "reconnects": 3}


def test_open_circuit_and_disconnected_publisher_are_critical() -> None:
    record = status(
        circuit={"state": "open", "next_attempt_at": NOW + 30},
        publisher={"connected": False, "last_error": "ConnectionRefusedError"},
    )
    found = gateway_alerts(record, NOW)
    assert [(a.name, a.severity) for a in found] == [
        ("gateway.circuit.open", "critical"),
        ("gateway.publisher.down", "critical"),
    ]
    assert found[0].details == {"next_attempt_at": NOW + 30}
    assert found[1].details == {"error": "ConnectionRefusedError"}


def test_quarantined_private_items_warn_until_an_hour_passes_without_one(settings) -> None:
    settings.MONITOR_QUARANTINE_ALERT_FOR = 3600.0
    reasons = {"order item without category": 2}
    record = status(counters={"quarantined": 2}, quarantined_by_reason=reasons, quarantined_at=NOW - 30)
    (alert,) = gateway_alerts(record, NOW)
    assert (alert.name, alert.subject, alert.severity) == ("gateway.quarantined", "gateway", "warning")
    assert alert.details == {"count": 2, "by_reason": reasons, "last_at": NOW - 30}
    assert gateway_alerts({**record, "quarantined_at": NOW - 3601}, NOW) == []
    assert gateway_alerts({**record, "quarantined_at": None}, NOW) == []


def test_a_blocked_publisher_is_critical_and_set_aside_events_warn() -> None:
    record = status(publisher={"connected": True, "blocked": True}, counters={"unencodable": 2})
    found = gateway_alerts(record, NOW)
    assert [(a.name, a.severity, a.details) for a in found] == [
        ("gateway.publisher.blocked", "critical", {}),
        ("gateway.publisher.unencodable", "warning", {"events": 2}),
    ]


def test_balance_rows_the_database_refused_warn() -> None:
    (alert,) = gateway_alerts(status(balances={"pending": 0, "rejected": 1}), NOW)
    assert (alert.name, alert.severity, alert.details) == ("gateway.balances.rejected", "warning", {"rows": 1})


@pytest.mark.parametrize("state", ["starting", "standby", "stopping"])
def test_a_gateway_not_running_yet_or_any_more_is_judged_on_freshness_only(state: str) -> None:
    record = status(state=state, sockets=[{"name": "linear-1", "state": "connecting"}], publisher={"connected": False})
    assert gateway_alerts(record, NOW) == []


def test_bybit_refusing_the_api_key_is_a_critical_alert_on_the_private_socket() -> None:
    refused = {"name": "private-1", "category": "private", "state": "auth_failed", "last_error": "", "reconnects": 4,
               "auth_error": "API key is invalid.", "auth_failures": 4, "auth_failing_since": NOW - 60}  # fmt: skip
    found = gateway_alerts(status(sockets=[status()["sockets"][0], refused]), NOW)
    assert [(a.name, a.subject, a.severity) for a in found] == [
        ("gateway.socket.down", "private-1", "critical"),
        ("gateway.private_auth_failed", "private-1", "critical"),
    ]
    assert found[1].details == {"auth_error": "API key is invalid.", "auth_failures": 4, "auth_failing_since": NOW - 60}
    assert found[1].family in GATEWAY_FAMILIES  # resolved by the gateway monitor once auth succeeds


def test_each_open_endpoint_circuit_is_its_own_alert() -> None:
    linear, spot = "wss://stream.bybit.com/v5/public/linear", "wss://stream.bybit.com/v5/public/spot"
    record = status(
        circuit={"state": "open", "next_attempt_at": NOW + 30, "endpoint": linear},
        circuits={
            linear: {"state": "open", "next_attempt_at": NOW + 30},
            spot: {"state": "half_open", "next_attempt_at": None},
            "wss://stream.bybit.com/v5/private": {"state": "closed", "next_attempt_at": None},
        },
    )
    found = gateway_alerts(record, NOW)
    assert [(a.name, a.subject, a.details) for a in found] == [
        ("gateway.circuit.open", linear, {"next_attempt_at": NOW + 30})
    ]


def test_a_queue_refusing_private_events_warns_and_is_critical_once_they_spill() -> None:
    """Parked events for a full queue: a warning per queue; spilling into its overflow queue: critical."""
    private = {
        "parked": {"ws-gateway.bravo.order": 15, "ws-gateway.carol.execution": 10_000},
        "spilling": ["ws-gateway.carol.execution"],
        "spilled": {"ws-gateway.carol.execution": 42},
    }
    found = gateway_alerts(status(private=private), NOW)
    assert [(a.name, a.subject, a.severity) for a in found] == [
        ("queue.private_rejecting.warning", "ws-gateway.bravo.order", "warning"),
        ("queue.private_rejecting.critical", "ws-gateway.carol.execution", "critical"),
    ]
    assert found[1].details == {"parked": 10_000, "spilled": 42, "spilling": True}
    assert found[0].family == found[1].family == "queue.private_rejecting"
    assert gateway_alerts(status(private={"parked": {}, "spilling": [], "spilled": {"x": 3}}), NOW) == []


def test_anything_in_the_unroutable_queue_warns() -> None:
    """Events the exchange had no queue for: a queue or binding is missing."""
    assert unroutable_alerts(None) == unroutable_alerts(0) == []
    (alert,) = unroutable_alerts(7)
    assert (alert.name, alert.subject, alert.severity, alert.details) == (
        "queue.unroutable",
        "ws-gateway.unroutable",
        "warning",
        {"depth": 7},
    )


def test_market_events_the_full_hand_off_dropped_warn_and_conflation_alone_does_not() -> None:
    (alert,) = gateway_alerts(status(counters={"dropped": 40, "conflated": 9_000}), NOW)
    assert (alert.name, alert.severity, alert.details) == ("gateway.market_dropped", "warning", {"events": 40})
    assert gateway_alerts(status(counters={"dropped": 0, "conflated": 9_000}), NOW) == []


def test_a_gateway_reading_late_warns_with_its_pacing_interval() -> None:
    (alert,) = gateway_alerts(status(pacing={"behind": True, "interval_ms": 400, "held": 12}), NOW)
    details = {"interval_ms": 400, "consumers_behind": False}
    assert (alert.name, alert.severity, alert.details) == ("gateway.reading_late", "warning", details)
    behind = {"behind": True, "consumers_behind": True, "interval_ms": 100, "held": 3}
    (alert,) = gateway_alerts(status(pacing=behind), NOW)
    assert alert.details == {"interval_ms": 100, "consumers_behind": True}  # a slow consumer, not the gateway
    assert gateway_alerts(status(pacing={"behind": False, "interval_ms": 400, "held": 0}), NOW) == []
