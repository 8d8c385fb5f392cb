"""Two gateways never serve at once: an owner cut off from Redis stops before its standby takes over."""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import urlsplit

import pytest

from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import GatewayThread, QueueReader, wait_for
from tests.relay import TcpRelay

pytestmark = pytest.mark.django_db(transaction=True)


class StandbyThread:
    """A real Gateway started while another owns the lock: it waits as standby in its own thread."""

    def __init__(self) -> None:
        from streaming.gateway import Gateway, GatewayConfig

        self.gateway = Gateway(GatewayConfig.from_settings())
        self.result: int | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", asyncio.run(self.gateway.run())))
        self.thread.start()
        wait_for(lambda: self.gateway.state == "standby", message="the standby to wait")

    def stop(self) -> int | None:
        if self.gateway.loop is not None and self.thread.is_alive():
            self.gateway.loop.call_soon_threadsafe(self.gateway.stop_event.set)
        self.thread.join(15)
        return self.result


def active(subscription: Subscription) -> bool:
    subscription.refresh_from_db()
    return subscription.status == "active"


def private_live(runner: GatewayThread | StandbyThread) -> bool:
    return any(s.category == "private" and "order" in s.live for s in list(runner.gateway.sockets.values()))


def test_an_owner_cut_off_from_redis_stops_before_the_standby_serves(gateway_settings, simulator, rabbit) -> None:
    parts = urlsplit(gateway_settings.REDIS_URL)
    relay = TcpRelay(parts.hostname or "127.0.0.1", parts.port or 6379)
    real_url = gateway_settings.REDIS_URL
    gateway_settings.REDIS_URL = relay.url(parts.scheme, parts.path or "/0")  # only the owner goes through it
    owner = GatewayThread()
    gateway_settings.REDIS_URL = real_url
    standby = StandbyThread()
    try:
        book, _ = subscription_create(
            service_name="alpha", channel="orderbook", category="linear", symbol="BTCUSDT", depth=50
        )
        orders, _ = subscription_create(service_name="alpha", channel="order")
        wait_for(lambda: active(book) and active(orders) and private_live(owner), message="both streams live")
        books = QueueReader(rabbit, "ws-gateway.alpha.orderbook")
        fills = QueueReader(rabbit, "ws-gateway.alpha.order")
        books.wait(lambda m: len(m) >= 20, message="the owner's stream")
        at = "1700000000000"
        fill = {
            "orderId": "fill-1",
            "createdTime": at,
            "updatedTime": at,
            "orderStatus": "Filled",
            "cumExecQty": "0.010",
        }
        sent = simulator.call(simulator.sim.emit_order(**fill))
        fills.wait(lambda m: len(m) == 1, message="the fill from the owner")

        relay.partition()
        wait_for(lambda: standby.gateway.state == "running", timeout=10, message="the standby to take over")
        new_run = standby.gateway.envelopes.run_id
        books.wait(lambda m: sum(e["trace_id"].startswith(new_run) for e in m) >= 20, message="the new owner's stream")
        # The same fill again, as the new owner reads it (a back-fill, or Bybit's copy on both sockets).
        wait_for(lambda: private_live(standby), message="the new owner's private socket")
        simulator.call(simulator.sim.emit_order(**fill))
        fills.wait(lambda m: len(m) >= 2, message="the fill from the new owner")
        fills.drain(0.5)  # a copy from a second publisher would arrive now

        runs = [e["trace_id"].rsplit("-", 1)[0] for e in books.messages]
        first_new = runs.index(new_run)
        assert set(runs[first_new:]) == {new_run}, "the old owner published after the new one started"
        epochs = [m.properties["application_headers"]["epoch"] for m in books.raw]
        assert epochs == sorted(epochs) and len(set(epochs)) == 2
        assert epochs[first_new - 1] < epochs[first_new]
        assert owner.stop() == 3  # it fenced itself and exited for the supervisor
        assert [m["data"] for m in fills.messages] == [sent["data"][0]] * 2  # one copy per owner
        first, second = (m["id"] for m in fills.messages)
        assert first == second == "order:fill-1:1700000000000:Filled:0.010"  # a consumer keeps one
        assert [m.properties["message_id"] for m in fills.raw] == [first, second]
        fill_epochs = [m.properties["application_headers"]["epoch"] for m in fills.raw]
        assert fill_epochs[0] < fill_epochs[1] == standby.gateway.lock.epoch
        books.close()
        fills.close()
    finally:
        owner.stop()
        standby.stop()
        relay.close()
