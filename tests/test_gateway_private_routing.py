"""Private events reach every queue bound for them: deleted queues come back; a full queue holds back only itself."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import pytest

from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from subscriptions.topics import EXCHANGE
from tests.conftest import QueueReader, management_api, wait_for
from wsgateway.health import read_gateway_status, redis_client

pytestmark = pytest.mark.django_db(transaction=True)


def active(*subscriptions: Subscription) -> bool:
    for subscription in subscriptions:
        subscription.refresh_from_db()
    return all(s.status == "active" for s in subscriptions)


def queue_url(rabbit: str, name: str) -> str:
    return f"/queues/{urlsplit(rabbit).path[1:]}/{quote(name, safe='')}"


def queue_exists(rabbit: str, name: str) -> bool:
    return management_api(queue_url(rabbit, name)).status_code == 200


def emit_orders(simulator, count: int, first: int = 0) -> list[str]:
    """Emit `count` order updates; return their order ids, in emission order."""
    sent = []
    for n in range(first, first + count):
        message = simulator.call(simulator.sim.emit_order(symbol="BTCUSDT", category="linear", price=str(100 + n)))
        sent.append(message["data"][0]["orderId"])
    return sent


def order_ids(messages: list[dict]) -> list[str]:
    return [m["data"]["orderId"] for m in messages]


def private_status() -> dict:
    """What an operator sees of private delivery: the gateway's status record in Redis."""
    client = redis_client(1.0)
    status = read_gateway_status(client) or {}
    client.close()
    return status.get("private", {})


def test_deleted_order_queue_is_declared_again_and_gets_every_order(start_gateway, simulator, rabbit) -> None:
    """An operator deletes a service's order queue: orders emitted meanwhile and after all reach the new queue."""
    runner = start_gateway()
    orders, _ = subscription_create(service_name="alpha", channel="order")
    wait_for(lambda: active(orders), message="the order subscription active")
    assert management_api(queue_url(rabbit, "ws-gateway.alpha.order"), "DELETE").status_code == 204
    sent = emit_orders(simulator, 3)
    wait_for(lambda: queue_exists(rabbit, "ws-gateway.alpha.order"), timeout=5, message="the queue declared again")
    sent += emit_orders(simulator, 3, first=3)
    reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    reader.wait(lambda m: set(order_ids(m)) >= set(sent), timeout=10, message="all six orders in the new queue")
    assert sorted(set(order_ids(reader.messages))) == sorted(sent)
    counters = runner.gateway.status()["counters"]
    assert counters["returned"] >= 1 and runner.gateway.publisher.reconnects == 0  # came back, and cost no reconnect
    reader.close()


def test_exchange_deleted_and_recreated_by_an_operator_loses_no_order(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    """The events exchange is deleted and made again without bindings: orders still arrive, trades resume."""
    gateway_settings.GATEWAY_REDECLARE_INTERVAL = 1.0
    start_gateway()
    orders, _ = subscription_create(service_name="alpha", channel="order")
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    wait_for(lambda: active(orders, trades), message="both subscriptions active")
    vhost = urlsplit(rabbit).path[1:]
    exchange = f"/exchanges/{vhost}/{quote(EXCHANGE, safe='')}"
    assert management_api(exchange, "DELETE").status_code == 204
    management_api(exchange, "PUT", json={"type": "topic", "durable": True})  # unless the gateway was first
    assert management_api(exchange).status_code == 200
    sent = emit_orders(simulator, 4)
    orders_reader = QueueReader(rabbit, "ws-gateway.alpha.order")
    orders_reader.wait(lambda m: set(order_ids(m)) >= set(sent), timeout=10, message="every order")
    trades_reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    trades_reader.drain()
    seen = len(trades_reader.messages)
    trades_reader.wait(lambda m: len(m) >= seen + 3, timeout=10, message="trades bound again and flowing")
    orders_reader.close()
    trades_reader.close()


def test_a_subscription_made_while_its_topic_is_being_confirmed_is_active_only_once_routed(
    start_gateway, gateway_settings, simulator, rabbit, monkeypatch
) -> None:
    """Bravo subscribes while Bybit is yet to confirm alpha's orders: bravo reads active only once it gets them.

    Bybit's confirmation of the topic used to turn every pending row of it active, bravo's too,
    before any reconcile round had declared bravo's queue or routed orders to it: the orders
    emitted next reached alpha and not bravo.
    """
    gateway_settings.GATEWAY_RECONCILE_INTERVAL = 60.0  # no round but the ones a nudge asks for
    gateway_settings.GATEWAY_REPLY_TIMEOUT = 0.3
    runner = start_gateway()
    simulator.call(simulator.sim.control.ignore_requests(1.5))
    alpha, _ = subscription_create(service_name="alpha", channel="order")

    def subscribe_sent() -> bool:
        return any(r.get("op") == "subscribe" and r["category"] == "private" for r in simulator.requests)

    wait_for(subscribe_sent, message="alpha's order subscribe sent (and left unanswered)")
    with monkeypatch.context() as patch:  # bravo's nudge is lost: no round sees bravo before Bybit answers
        patch.setattr("subscriptions.services.nudge_gateway", lambda **kwargs: False)
        bravo, _ = subscription_create(service_name="bravo", channel="order")
    wait_for(lambda: active(alpha), timeout=8, message="alpha's subscription active once Bybit answers")
    bravo.refresh_from_db()
    assert bravo.status == "pending"  # no queue declared for it, no order routed to it yet
    assert not queue_exists(rabbit, "ws-gateway.bravo.order")
    runner.gateway.nudge()  # what the lost nudge would have done (the periodic round does it too)
    wait_for(lambda: active(bravo), message="bravo's subscription active after a round")
    sent = emit_orders(simulator, 3)
    reader = QueueReader(rabbit, "ws-gateway.bravo.order")
    reader.wait(lambda m: len(m) >= 3, message="bravo gets every order emitted once it reads active")
    assert order_ids(reader.messages) == sent
    reader.close()


def test_full_queue_stalls_only_itself_and_later_gets_every_order_in_order(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    """Two services want orders; bravo's queue is full. Alpha gets each once, in order; bravo all of them, in order."""
    gateway_settings.QUEUE_MAX_LENGTH = {**gateway_settings.QUEUE_MAX_LENGTH, "order": 5}
    start_gateway()
    alpha, _ = subscription_create(service_name="alpha", channel="order")
    bravo, _ = subscription_create(service_name="bravo", channel="order")
    wait_for(lambda: active(alpha, bravo), message="both order subscriptions active")
    healthy = QueueReader(rabbit, "ws-gateway.alpha.order")
    sent = emit_orders(simulator, 20)
    healthy.wait(lambda m: len(m) >= 20, message="twenty orders for alpha")

    def bravo_parked() -> int:
        return private_status().get("parked", {}).get("ws-gateway.bravo.order", 0)

    # 15 refused: all parked, or 14 while the lane's one probe (its oldest, sent alone) is in flight.
    wait_for(lambda: bravo_parked() in (14, 15), message="bravo's refused orders parked")
    full = QueueReader(rabbit, "ws-gateway.bravo.order")
    full.wait(lambda m: len(m) >= 20, timeout=15, message="every order for bravo once it drains")
    full.drain(0.5)
    assert order_ids(full.messages) == sent
    wait_for(lambda: bravo_parked() == 0, message="nothing parked any more")
    healthy.drain(0.5)
    assert order_ids(healthy.messages) == sent  # each once, in order: bravo's refusals caused no copies
    healthy.close()
    full.close()


def test_past_the_park_limit_orders_go_to_the_overflow_queue_and_none_is_lost(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    """Bravo's queue takes 2, the gateway parks 3 more; later orders go to `<queue>.overflow`, in order."""
    gateway_settings.QUEUE_MAX_LENGTH = {**gateway_settings.QUEUE_MAX_LENGTH, "order": 2}
    gateway_settings.GATEWAY_PARK_LIMIT = 3
    start_gateway()
    bravo, _ = subscription_create(service_name="bravo", channel="order")
    wait_for(lambda: active(bravo), message="the order subscription active")
    sent = emit_orders(simulator, 3)
    wait_for(lambda: private_status().get("parked", {}).get("ws-gateway.bravo.order") == 1, message="one parked")
    sent += emit_orders(simulator, 7, first=3)
    wait_for(lambda: "ws-gateway.bravo.order" in private_status().get("spilling", []), message="spilling")
    wait_for(lambda: queue_exists(rabbit, "ws-gateway.bravo.order.overflow"), message="the overflow queue")
    overflow = QueueReader(rabbit, "ws-gateway.bravo.order.overflow")
    overflow.wait(lambda m: len(m) >= 5, message="five orders in the overflow queue")
    queue = QueueReader(rabbit, "ws-gateway.bravo.order")
    queue.wait(lambda m: len(m) >= 5, message="the queue's own two, then the three parked")
    queue.drain(0.3)
    overflow.drain(0.3)
    assert order_ids(queue.messages) == sent[:5]
    assert order_ids(overflow.messages) == sent[5:]
    wait_for(lambda: not private_status().get("spilling"), message="caught up: no longer spilling")
    queue.close()
    overflow.close()


def test_market_events_for_a_deleted_queue_land_in_the_unroutable_queue_and_raise_an_alert(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    """The alternate exchange keeps what no queue was bound for; the monitor warns; the queue comes back."""
    from streaming.monitoring.readings import read_unroutable_depth
    from streaming.monitoring.runs import check_queues

    gateway_settings.GATEWAY_REDECLARE_INTERVAL = 3.0
    start_gateway()
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    wait_for(lambda: active(trades), message="the trade subscription active")
    assert management_api(queue_url(rabbit, "ws-gateway.alpha.trade"), "DELETE").status_code == 204
    wait_for(lambda: (read_unroutable_depth() or 0) > 0, message="trades kept in ws-gateway.unroutable")
    client = redis_client(1.0)
    assert "queue.unroutable:firing" in check_queues(client)["events"]
    client.close()
    wait_for(lambda: queue_exists(rabbit, "ws-gateway.alpha.trade"), timeout=8, message="the queue declared again")
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 3, message="trades flowing to the queue again")
    reader.close()


def test_after_a_publisher_reconnect_queues_the_broker_lost_are_declared_again_at_once(
    start_gateway, gateway_settings, simulator, rabbit
) -> None:
    """A broker back without its definitions: the reconnect alone has the queues declared again, no periodic refresh."""
    from tests.conftest import close_publisher_connections

    gateway_settings.GATEWAY_REDECLARE_INTERVAL = 3600.0  # the periodic refresh cannot be what brings them back
    runner = start_gateway()
    trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
    wait_for(lambda: active(trades), message="the trade subscription active")
    assert management_api(queue_url(rabbit, "ws-gateway.alpha.trade"), "DELETE").status_code == 204
    wait_for(lambda: close_publisher_connections(rabbit) > 0, message="the publisher's connection cut")
    wait_for(lambda: runner.gateway.publisher.reconnects >= 1, message="the publisher reconnected")
    wait_for(lambda: queue_exists(rabbit, "ws-gateway.alpha.trade"), timeout=5, message="the queue declared again")
    reader = QueueReader(rabbit, "ws-gateway.alpha.trade")
    reader.wait(lambda m: len(m) >= 3, message="trades flowing to the queue again")
    reader.close()
