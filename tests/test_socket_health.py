"""What the status record shows of one socket: outages and Bybit's refusals of the API key."""

from __future__ import annotations

from streaming.bybit import SocketHealth


def test_an_outage_is_counted_once_and_measured_from_its_first_failure() -> None:
    health = SocketHealth()
    assert health.up(100.0) is None  # the first connect is no outage
    health.down(200.0)
    health.down(201.0)  # a failed reconnect inside the same outage
    assert health.up(203.5) == 3.5
    assert health.reconnects == 1
    assert health.snapshot()["last_outage"] == {"from": 200.0, "to": 203.5, "seconds": 3.5}


def auth(health: SocketHealth) -> tuple:
    shown = health.snapshot()
    return shown["auth_error"], shown["auth_failures"], shown["auth_failing_since"]


def test_auth_refusals_count_up_and_clear_when_bybit_accepts_the_key() -> None:
    health = SocketHealth()
    health.auth_refused("API key is invalid.", 10.0)
    health.auth_refused("API key is invalid.", 12.0)
    assert auth(health) == ("API key is invalid.", 2, 10.0)
    assert health.auth_accepted() == 2
    health.auth_refused("Params Error", 50.0)
    assert auth(health) == ("Params Error", 3, 50.0)
    assert health.auth_refused_in_a_row == 1  # the backoff starts over
