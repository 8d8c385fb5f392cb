"""Queues of cancelled subscriptions: deleted on request (API, admin) or after a grace period, never while in use."""

from __future__ import annotations

from datetime import timedelta

import amqp
import orjson
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from streaming.models import QueueSample
from streaming.monitoring import runs, tasks
from streaming.publisher import connect
from streaming.reconciler import queue_arguments
from subscriptions.models import Subscription
from subscriptions.services import subscription_cancel, subscription_create
from tests.test_monitor import wait_management

pytestmark = pytest.mark.django_db(transaction=True)

TRADES = "ws-gateway.alpha.trade"
URL = "/api/v1/queues"


@pytest.fixture
def channel(rabbit):
    conn = connect(rabbit, name="test queues")
    yield conn
    conn.close()


def fill(conn: amqp.Connection, queue: str, messages: int = 0) -> None:
    """Declare the queue as the gateway does and put `messages` in it."""
    event_class = queue.rsplit(".", 1)[1]
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, auto_delete=False, arguments=queue_arguments(event_class))
    for i in range(messages):
        ch.basic_publish(amqp.Message(orjson.dumps({"n": i})), exchange="", routing_key=queue)
    ch.close()


def exists(conn: amqp.Connection, queue: str) -> int | None:
    """The queue's ready count, or None when RabbitMQ has no such queue."""
    try:
        ch = conn.channel()
        _, ready, _ = ch.queue_declare(queue, passive=True)
        ch.close()
    except amqp.NotFound:
        return None
    return ready


def ended(channel_name: str, hours_ago: float, service: str = "alpha", **stream: str) -> Subscription:
    """A subscription cancelled `hours_ago`."""
    row, _ = subscription_create(service_name=service, channel=channel_name, **stream)
    subscription_cancel(subscription=row)
    Subscription.objects.filter(pk=row.pk).update(updated_at=timezone.now() - timedelta(hours=hours_ago))
    return row


def test_a_service_deletes_its_unused_queue_and_the_alerts_clear(
    api_client: APIClient, rabbit: str, channel, redis_prefix: str
) -> None:
    ended("trades", 0, category="linear", symbol="BTCUSDT")
    fill(channel, TRADES, 5)
    wait_management(rabbit, lambda q: q.get("messages_ready") == 5, "5 ready", name=TRADES)
    assert "queue.no_consumer:firing" in runs.monitor_queues()["events"]

    response = api_client.delete(f"{URL}/{TRADES}")
    assert response.status_code == 200
    assert response.json() == {"queue": TRADES, "messages_discarded": 5}
    assert exists(channel, TRADES) is None
    assert "queue.no_consumer:resolved" in runs.monitor_queues()["events"]
    assert api_client.delete(f"{URL}/{TRADES}").status_code == 404  # gone already


def test_a_queue_a_live_subscription_uses_is_refused_with_409(api_client: APIClient, channel) -> None:
    ended("trades", 30, category="linear", symbol="BTCUSDT")
    subscription_create(service_name="alpha", channel="trades", category="linear", symbol="ETHUSDT")
    fill(channel, TRADES, 3)
    response = api_client.delete(f"{URL}/{TRADES}")
    assert response.status_code == 409
    assert response.json() == {
        "code": "queue_in_use",
        "detail": f"1 live subscription(s) use {TRADES}: cancel them first.",
    }
    assert exists(channel, TRADES) == 3


def test_only_the_owner_and_the_operator_may_delete(
    api_client: APIClient, other_key: str, operator_client: APIClient, channel
) -> None:
    ended("trades", 0, category="linear", symbol="BTCUSDT")
    fill(channel, TRADES, 1)
    bravo = APIClient()
    bravo.credentials(HTTP_X_API_KEY=other_key)
    response = bravo.delete(f"{URL}/{TRADES}")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert exists(channel, TRADES) == 1
    for name in ("ws-gateway.alpha.nothing", "amq.direct", "ws-gateway.alpha.order"):
        assert api_client.delete(f"{URL}/{name}").status_code == 404
    assert APIClient().delete(f"{URL}/{TRADES}").status_code == 401
    assert operator_client.delete(f"{URL}/{TRADES}").json()["messages_discarded"] == 1


def test_the_beat_task_deletes_queues_past_their_grace_period(channel, settings) -> None:
    settings.QUEUE_DELETE_AFTER_HOURS = 24
    ended("trades", 25, category="linear", symbol="BTCUSDT")  # due
    ended("ticker", 1, category="linear", symbol="BTCUSDT")  # in its grace period
    ended("orderbook", 25, category="linear", symbol="BTCUSDT", depth=50)
    subscription_create(service_name="alpha", channel="orderbook", category="linear", symbol="ETHUSDT", depth=50)
    ended("order", 25)  # private, with events nobody read: kept
    ended("execution", 25)  # private and empty: deleted
    queues = {f"ws-gateway.alpha.{c}": n for c, n in [("trade", 7), ("ticker", 1), ("orderbook", 1), ("order", 2),
                                                      ("execution", 0)]}  # fmt: skip
    for queue, messages in queues.items():
        fill(channel, queue, messages)

    settings.QUEUE_DELETE_AFTER_HOURS = 0  # off
    assert tasks.delete_unused_queues() == {"deleted": {}, "kept": []}
    settings.QUEUE_DELETE_AFTER_HOURS = 24
    result = tasks.delete_unused_queues()
    assert result == {
        "deleted": {"ws-gateway.alpha.execution": 0, "ws-gateway.alpha.trade": 7},
        "kept": ["ws-gateway.alpha.order"],
    }
    assert {q: exists(channel, q) for q in queues} == {
        "ws-gateway.alpha.trade": None,
        "ws-gateway.alpha.ticker": 1,
        "ws-gateway.alpha.orderbook": 1,
        "ws-gateway.alpha.order": 2,
        "ws-gateway.alpha.execution": None,
    }
    assert tasks.delete_unused_queues() == {"deleted": {}, "kept": ["ws-gateway.alpha.order"]}
    assert "delete-unused-queues" in settings.CELERY_BEAT_SCHEDULE


def test_the_admin_deletes_selected_queues_unless_in_use(channel) -> None:
    ended("trades", 0, category="linear", symbol="BTCUSDT")
    subscription_create(service_name="alpha", channel="ticker", category="linear", symbol="BTCUSDT")
    now = timezone.now()
    samples = [
        QueueSample.objects.create(queue=queue, service_name="alpha", event_class=queue.rsplit(".", 1)[1],
                                   taken_at=now, source="management", ready=2, consumers=0)
        for queue in (TRADES, "ws-gateway.alpha.ticker")
    ]  # fmt: skip
    for sample in samples:
        fill(channel, sample.queue, 2)
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw"))
    page = admin.post(
        "/admin/streaming/queuestatus/",
        {"action": "delete_queues", "_selected_action": [s.pk for s in samples]},
        follow=True,
    ).content.decode()
    assert f"Deleted {TRADES} (2 messages)." in page
    assert "Kept ws-gateway.alpha.ticker: 1 live subscription(s) use ws-gateway.alpha.ticker" in page
    assert exists(channel, TRADES) is None and exists(channel, "ws-gateway.alpha.ticker") == 2
