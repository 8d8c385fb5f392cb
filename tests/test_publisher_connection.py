"""The publisher's AMQP connection: backoff, liveness, broker flow control and closes, against RabbitMQ.

Where RabbitMQ has to misbehave (stall, send connection.blocked, drop a connection at once),
a proxy in front of it does (tests/amqpproxy.py); everything else is the real broker.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import amqp
import orjson
import pytest
from pamqp import commands
from pamqp.frame import marshal

from streaming.publisher import Handoff, negotiate
from subscriptions.topics import EXCHANGE
from tests.amqpproxy import AmqpProxy
from tests.conftest import close_publisher_connections, wait_for
from tests.test_publisher import channel, declare, make_event, read_all, run_publisher  # noqa: F401 - fixture

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


@pytest.fixture
def proxy() -> Iterator[AmqpProxy]:
    running = AmqpProxy()
    yield running
    running.close()


def test_a_connection_that_dies_young_does_not_reset_the_backoff(rabbit: str) -> None:
    """A broker that takes the handshake, then drops us at once: the delay keeps growing."""
    proxy = AmqpProxy(close_after=0.3)
    publisher = run_publisher(proxy.url(rabbit), Handoff(10), healthy_after=5.0)
    try:
        wait_for(lambda: publisher.reconnects >= 4, timeout=10, message="four short-lived connections")
        assert publisher.attempt >= 4  # one more per connection, none reset
    finally:
        publisher.stop(0.1)
        proxy.close()


def test_the_publisher_socket_has_no_timeout_of_its_own(rabbit: str) -> None:
    """No TCP_USER_TIMEOUT or read/write timeout: a broker slow for a second is not a dead broker."""
    publisher = run_publisher(rabbit, Handoff(10))
    try:
        wait_for(lambda: publisher.connected, message="the publisher connected")
        sock = publisher.protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT) == 0
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            assert struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, option, 16)) == (0, 0)
    finally:
        publisher.stop(1)


@pytest.mark.parametrize(("ours", "theirs", "agreed"), [(30, 60, 30), (30, 10, 10), (30, 0, 30), (0, 60, 60)])
def test_tune_limits_take_the_smaller_value_and_zero_means_none(ours: int, theirs: int, agreed: int) -> None:
    assert negotiate(ours, theirs) == agreed


def test_the_negotiated_heartbeat_judges_a_stalled_broker(rabbit: str, proxy: AmqpProxy, channel) -> None:  # noqa: F811
    """Heartbeat 2 s agreed with RabbitMQ: a 1.5 s stall is survived, a longer one ends the connection in ~4 s."""
    declare(channel, "t.stall")
    publisher = run_publisher(proxy.url(rabbit), Handoff(100), heartbeat=2)
    wait_for(lambda: publisher.connected, message="the publisher connected")
    assert publisher.protocol.heartbeat == 2
    proxy.freeze()
    publisher.put(make_event(1))
    time.sleep(1.5)  # the stall being simulated, not a wait for a condition
    proxy.thaw()
    wait_for(lambda: publisher.confirmed == 1, message="the event confirmed after a short stall")
    assert publisher.reconnects == 0
    proxy.freeze()
    frozen_at = time.monotonic()
    wait_for(lambda: publisher.reconnects == 1, timeout=8, message="the stalled connection declared dead")
    assert 3.0 <= time.monotonic() - frozen_at <= 6.0
    assert "no heartbeat" in publisher.last_error
    proxy.thaw()
    publisher.put(make_event(2))
    assert publisher.stop(10)
    assert sorted(orjson.loads(m.body)["n"] for m in read_all(channel, "t.stall", 2)) == [1, 2]


def test_connection_blocked_holds_publishing_even_when_tcp_drains(rabbit: str, proxy: AmqpProxy, channel) -> None:  # noqa: F811
    """connection.blocked and a full TCP buffer are separate: a drained buffer does not undo a block."""
    declare(channel, "t.blocked", **{"x-max-length": 1000})
    publisher = run_publisher(proxy.url(rabbit), Handoff(1000), window=60)
    wait_for(lambda: publisher.connected, message="the publisher connected")
    proxy.hold_upstream()
    for n in range(100):
        publisher.put(make_event(n, size=300_000))
    wait_for(lambda: publisher.protocol.writing_paused, timeout=10, message="TCP pushing back")
    proxy.inject(marshal(commands.Connection.Blocked("low on memory"), 0))
    wait_for(lambda: publisher.blocked, message="the broker's block seen")
    written = publisher.published
    proxy.release_upstream()
    wait_for(lambda: not publisher.protocol.writing_paused, timeout=10, message="TCP drained")
    wait_for(lambda: publisher.confirmed == written, timeout=10, message="what was written before, confirmed")
    assert publisher.published == written  # nothing new while blocked
    assert publisher.blocked
    proxy.inject(marshal(commands.Connection.Unblocked(), 0))
    assert publisher.stop(20)
    assert len(read_all(channel, "t.blocked", 100, timeout=20)) == 100


def test_rabbitmqs_close_is_answered_with_close_ok(rabbit: str, proxy: AmqpProxy, channel: amqp.Channel) -> None:  # noqa: F811
    """connection.close and channel.close get their Close-Ok before the publisher reconnects."""
    publisher = run_publisher(proxy.url(rabbit), Handoff(100))
    wait_for(lambda: publisher.connected, message="the publisher connected")
    wait_for(lambda: close_publisher_connections(rabbit) > 0, timeout=15, message="the connection closed by RabbitMQ")
    wait_for(lambda: proxy.sent_by_client(10, 51) == 1, message="connection.close-ok")
    wait_for(lambda: publisher.connected and publisher.reconnects == 1, message="a new connection")
    channel.exchange_delete(EXCHANGE)
    publisher.put(make_event(1))  # to an exchange that is gone: RabbitMQ closes the channel
    wait_for(lambda: proxy.sent_by_client(20, 41) == 1, message="channel.close-ok")
    wait_for(lambda: publisher.confirmed == 1, message="the event confirmed on the next connection")
    assert publisher.reconnects == 2
    assert publisher.stop(5)
