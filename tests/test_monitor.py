"""Queue and gateway monitoring through a real Celery worker, real RabbitMQ (management API), Redis and PostgreSQL."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlsplit

import amqp
import orjson
import pytest
import redis
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from streaming.models import QueueSample
from streaming.monitoring import tasks
from streaming.monitoring.alerts import active_alerts, post_webhook, sync_alerts
from streaming.monitoring.checks import QUEUE_FAMILIES, Alert
from streaming.monitoring.readings import read_queues
from streaming.publisher import connect
from streaming.reconciler import queue_arguments
from subscriptions.models import Subscription
from tests.conftest import management_api, wait_for
from wsgateway.health import read_gateway_status

pytestmark = pytest.mark.django_db(transaction=True)
QUEUE = "ws-gateway.alpha.trade"


@pytest.fixture
def worker(rabbit, redis_prefix, settings):
    """A real Celery worker thread consuming from the test vhost."""
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state

    from wsgateway.celery import app

    app.conf.update(broker_url=rabbit, result_backend=settings.REDIS_URL)
    app._pool = None  # the producer pool is built from broker_url on first use: rebuild it for this vhost
    app.amqp._producer_pool = None
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        yield app
        # The worker looks at the stop flag between messages: set it, then send one to wake it.
        state.should_terminate = 0
        tasks.prune_queue_samples.delay()


def logged(caplog, name: str) -> list[dict]:
    """The structlog events called `name` (from any thread, the worker's included)."""
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == name]


def run(task) -> dict:
    """Send a task to the worker and wait for its result."""
    return task.delay().get(timeout=30)


@pytest.fixture
def channel(rabbit):
    conn = connect(rabbit, name="test publisher")
    yield conn.channel()
    conn.close()


def declare(channel, event_class: str = "trade", name: str = QUEUE) -> None:
    channel.queue_declare(name, durable=True, auto_delete=False, arguments=queue_arguments(event_class))


def publish(channel, count: int, name: str = QUEUE) -> None:
    for i in range(count):
        channel.basic_publish(amqp.Message(orjson.dumps({"n": i})), exchange="", routing_key=name)


def management_figures(rabbit: str, name: str = QUEUE) -> dict:
    vhost = quote(urlsplit(rabbit).path[1:], safe="")
    return management_api(f"/queues/{vhost}/{quote(name, safe='')}").json()


def wait_management(rabbit: str, condition, message: str, name: str = QUEUE) -> dict:
    """RabbitMQ refreshes management figures every few seconds: wait until they show the condition."""
    return wait_for(lambda: (q := management_figures(rabbit, name)) and condition(q) and q, 20, 0.2, message)


class Webhook:
    """A local HTTP server recording every JSON POST."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(orjson.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def crossings(self) -> list[tuple[str, str]]:
        return [(e["alert"], e["state"]) for e in self.received]


@pytest.fixture
def webhook(settings):
    hook = Webhook()
    settings.ALERT_WEBHOOK_URL = hook.url
    yield hook
    hook.server.shutdown()


def test_backlog_without_consumer_warns_once_and_shows_in_api(worker, rabbit, channel, api_client, other_key, caplog):
    declare(channel)
    publish(channel, 1_200)
    wait_management(rabbit, lambda q: q.get("messages_ready") == 1_200, "1,200 ready in the management API")

    first = run(tasks.monitor_queues)
    assert sorted(first["events"]) == ["queue.backlog.warning:firing", "queue.no_consumer:firing"]
    fired = logged(caplog, "queue.backlog.warning")
    assert len(fired) == 1 and fired[0]["state"] == "firing" and fired[0]["subject"] == QUEUE
    assert fired[0]["details"]["depth"] == 1_200 and fired[0]["details"]["service"] == "alpha"
    assert run(tasks.monitor_queues)["events"] == []  # still true: not fired again

    listed = api_client.get("/api/v1/queues").json()["results"]
    assert [(q["queue"], q["depth"], q["status"], q["consumers"]) for q in listed] == [(QUEUE, 1_200, "warning", 0)]
    assert listed[0]["max_length"] == queue_arguments("trade")["x-max-length"]
    assert listed[0]["fill_percent"] == round(1_200 / listed[0]["max_length"] * 100, 2)
    detail = api_client.get(f"/api/v1/queues/{QUEUE}").json()
    assert detail["depth"] == 1_200 and len(detail["samples"]) == 2
    assert sorted(detail["alerts"]) == ["queue.backlog.warning", "queue.no_consumer"]

    from rest_framework.test import APIClient

    bravo = APIClient()
    bravo.credentials(HTTP_X_API_KEY=other_key)
    assert bravo.get("/api/v1/queues").json()["results"] == []
    response = bravo.get(f"/api/v1/queues/{QUEUE}")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert api_client.get(f"/api/v1/queues/{QUEUE}?samples=0").json()["code"] == "invalid"

    # Operators see the same numbers in the admin and in /metrics.
    from django.contrib.auth import get_user_model
    from django.test import Client

    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw"))
    page = admin.get("/admin/streaming/queuestatus/").content.decode()
    assert QUEUE in page and "1200" in page and "warning" in page
    text = Client().get("/metrics").content.decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    by_queue = {s.name: s.value for s in samples if s.labels.get("queue") == QUEUE}
    assert by_queue["wsgateway_queue_messages"] == 1_200 and by_queue["wsgateway_queue_status"] == 1  # warning
    firing = {s.labels["alert"]: s.value for s in samples if s.name == "wsgateway_alerts_active"}
    assert firing == {"queue.backlog.warning": 1, "queue.no_consumer": 1}


def test_retention_critical_clears_after_drain_with_one_post_per_crossing(worker, rabbit, channel, settings, webhook):
    settings.QUEUE_MAX_LENGTH = {**settings.QUEUE_MAX_LENGTH, "trade": 100}
    declare(channel)
    publish(channel, 97)
    wait_management(rabbit, lambda q: q.get("messages_ready") == 97, "97 of 100 ready")

    assert sorted(run(tasks.monitor_queues)["events"]) == [
        "queue.no_consumer:firing",
        "queue.retention.critical:firing",
    ]
    publish(channel, 30)  # 27 over the limit: drop-head discards the oldest
    # The management API updates its counters and its depths at different moments: wait for both.
    wait_management(
        rabbit,
        lambda q: q.get("message_stats", {}).get("publish") == 127 and q.get("messages_ready") == 100,
        "127 published, 100 kept",
    )
    assert run(tasks.monitor_queues)["events"] == []
    sample = QueueSample.objects.filter(queue=QUEUE).latest()
    assert (sample.ready, sample.status, sample.dropped_estimate) == (100, "critical", 27)

    while channel.basic_get(QUEUE, no_ack=True) is not None:
        pass
    wait_management(rabbit, lambda q: q.get("messages_ready") == 0, "the queue drained")
    resolved = run(tasks.monitor_queues)["events"]
    assert sorted(resolved) == ["queue.no_consumer:resolved", "queue.retention.critical:resolved"]

    wait_for(lambda: len(webhook.received) == 4, message="four webhook posts")
    assert sorted(webhook.crossings()) == [
        ("queue.no_consumer", "firing"),
        ("queue.no_consumer", "resolved"),
        ("queue.retention.critical", "firing"),
        ("queue.retention.critical", "resolved"),
    ]
    critical = next(e for e in webhook.received if e["alert"] == "queue.retention.critical")
    assert critical["severity"] == "critical" and critical["details"]["fill"] == 0.97
    assert run(tasks.monitor_queues)["events"] == [] and len(webhook.received) == 4


def test_consumer_slower_than_publisher_is_flagged_slow(worker, rabbit, channel, settings):
    settings.MONITOR_SLOW_SAMPLES = 2
    declare(channel)
    stop = threading.Event()

    def slow_consumer() -> None:
        conn = connect(rabbit, name="slow consumer")
        ch = conn.channel()
        ch.basic_qos(0, 1, False)
        ch.basic_consume(QUEUE, callback=lambda m: (time.sleep(0.1), ch.basic_ack(m.delivery_tag)))
        while not stop.is_set():
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
        conn.close()

    def publisher() -> None:
        conn = connect(rabbit, name="fast publisher")
        ch = conn.channel()
        while not stop.wait(0.01):
            publish(ch, 2)  # ~200/s against ~10/s consumed
        conn.close()

    threads = [threading.Thread(target=slow_consumer), threading.Thread(target=publisher)]
    for thread in threads:
        thread.start()
    try:
        events: list[str] = []
        last_depth = -1

        def next_sample() -> bool:
            nonlocal last_depth
            depth = wait_management(rabbit, lambda q: q.get("messages", -1) > last_depth, "the depth to grow")[
                "messages"
            ]
            last_depth = depth
            events.extend(run(tasks.monitor_queues)["events"])
            return "queue.slow_consumer:firing" in events

        wait_for(next_sample, timeout=60, interval=0, message="the slow consumer alert")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    sample = QueueSample.objects.filter(queue=QUEUE).latest()
    assert "queue.slow_consumer" in sample.alerts and sample.consumers == 1
    assert sample.publish_rate > sample.consume_rate


def test_gateway_that_stops_writing_status_raises_liveness_alert_once(
    worker, start_gateway, api_client, settings, webhook
):
    settings.GATEWAY_STATUS_STALE_AFTER = 1.0
    api_client.post("/api/v1/subscriptions", {"channel": "trades", "category": "linear", "symbol": "BTCUSDT"})
    runner = start_gateway()
    client = redis.Redis.from_url(settings.REDIS_URL)
    wait_for(
        lambda: (s := read_gateway_status(client)) and s["counters"]["published"] > 0,
        message="the gateway to publish",
    )
    assert run(tasks.monitor_gateway)["alerts"] == []

    # While it runs, /metrics carries its counters.
    from django.test import Client

    text = Client().get("/metrics").content.decode()
    metrics = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert metrics["wsgateway_gateway_up"].value == 1
    assert metrics["wsgateway_gateway_published_total"].value > 0
    assert metrics["wsgateway_gateway_socket_connected"].labels == {"socket": "linear-1", "category": "linear"}

    assert runner.stop() == 0
    wait_for(lambda: "gateway.status.stale:firing" in run(tasks.monitor_gateway)["events"], 15, 0.2, "the alert")
    assert run(tasks.monitor_gateway)["events"] == []
    wait_for(lambda: webhook.received, message="the webhook post")
    assert webhook.crossings() == [("gateway.status.stale", "firing")]
    client.close()


def test_subscriptions_without_events_are_flagged_stale(worker, settings, redis_prefix, api_client):
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.set(f"{redis_prefix}gateway:status", orjson.dumps({"updated_at": time.time(), "sockets": []}))
    long_ago = timezone.now() - timedelta(seconds=settings.MONITOR_STALE_SUBSCRIPTION_AFTER + 60)
    rows = {
        name: Subscription.objects.create(
            service_name="alpha", channel=channel, category="linear" if channel != "order" else "",
            symbol="BTCUSDT" if channel != "order" else "", event_class=channel, bybit_topic=f"{channel}.{name}",
            routing_key=f"{channel}.{name}", queue_name=f"ws-gateway.alpha.{channel}", status="active",
            last_event_at=last,
        )
        for name, channel, last in [
            ("quiet", "trade", long_ago), ("busy", "trade", timezone.now()), ("private", "order", long_ago),
        ]
    }  # fmt: skip
    result = run(tasks.monitor_gateway)
    assert result["events"] == ["subscription.stale:firing"]
    stored = {a["subject"]: a for a in active_alerts(client)}
    assert set(stored) == {str(rows["quiet"].id)}
    assert stored[str(rows["quiet"].id)]["details"]["topic"] == "trade.quiet"
    flags = {name: api_client.get(f"/api/v1/subscriptions/{row.id}").json()["stale"] for name, row in rows.items()}
    assert flags == {"quiet": True, "busy": False, "private": False}

    Subscription.objects.filter(pk=rows["quiet"].pk).update(last_event_at=timezone.now())
    assert run(tasks.monitor_gateway)["events"] == ["subscription.stale:resolved"]
    client.close()


def test_without_management_api_depth_comes_from_passive_declare(rabbit, channel, settings, redis_prefix, caplog):
    Subscription.objects.create(
        service_name="alpha", channel="trade", category="linear", symbol="BTCUSDT", event_class="trade",
        bybit_topic="publicTrade.BTCUSDT", routing_key="trade.linear.BTCUSDT", queue_name=QUEUE,
    )  # fmt: skip
    declare(channel)
    publish(channel, 3)
    management_url, settings.RABBITMQ_MANAGEMENT_URL = settings.RABBITMQ_MANAGEMENT_URL, "http://127.0.0.1:9"
    readings = read_queues()  # nothing listens on port 9
    settings.RABBITMQ_MANAGEMENT_URL = management_url  # the vhost clean-up needs it
    assert [(r.queue, r.source, r.ready, r.consumers, r.max_length) for r in readings] == [
        (QUEUE, "declare", 3, 0, queue_arguments("trade")["x-max-length"])
    ]
    assert len(logged(caplog, "monitor.management_unavailable")) == 1


def test_alert_escalation_is_one_crossing_and_webhook_failure_is_logged_without_the_url(redis_prefix, settings, caplog):
    client = redis.Redis.from_url(settings.REDIS_URL)
    warning = Alert("queue.backlog.warning", QUEUE, "warning", {"depth": 1_500})
    critical = Alert("queue.backlog.critical", QUEUE, "critical", {"depth": 12_000})
    families = QUEUE_FAMILIES
    assert [e["alert"] for e in sync_alerts(client, families, [warning])] == ["queue.backlog.warning"]
    escalated = sync_alerts(client, families, [critical])
    assert [(e["alert"], e["state"], e["previous"]) for e in escalated] == [
        ("queue.backlog.critical", "firing", "queue.backlog.warning")
    ]
    assert sync_alerts(client, ["gateway.status"], []) == []  # other families leave it alone
    assert [(e["alert"], e["state"]) for e in sync_alerts(client, families, [])] == [
        ("queue.backlog.critical", "resolved")
    ]

    sent = post_webhook("http://127.0.0.1:9/hook?token=s3cr3t", escalated * 3)
    assert sent == 0
    assert [(e["undelivered"], e["host"]) for e in logged(caplog, "alert.webhook_failed")] == [(3, "127.0.0.1")]
    assert "s3cr3t" not in caplog.text
    client.close()


def test_a_busy_queue_far_from_full_reports_no_drops(rabbit, channel, settings, redis_prefix):
    """Counted directly nothing is lost, and the monitor says so, though RabbitMQ's publish and deliver
    counters and its ready count are taken at different moments (the bare subtraction shows drops here)."""
    from streaming.monitoring import runs

    settings.QUEUE_MAX_LENGTH = {**settings.QUEUE_MAX_LENGTH, "trade": 5_000}
    declare(channel)
    stop, published, received = threading.Event(), itertools.count(), set()

    def send(ch, count: int) -> None:
        for _ in range(count):
            ch.basic_publish(amqp.Message(orjson.dumps(next(published))), exchange="", routing_key=QUEUE)

    def consumer() -> None:
        conn = connect(rabbit, name="steady consumer")
        ch = conn.channel()
        ch.basic_qos(0, 1, False)

        def on_message(message) -> None:
            time.sleep(0.002)
            received.add(orjson.loads(message.body))
            ch.basic_ack(message.delivery_tag)

        ch.basic_consume(QUEUE, callback=on_message)
        while not stop.is_set():
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
        conn.close()

    def publisher() -> None:
        conn = connect(rabbit, name="steady publisher")
        ch = conn.channel()
        while not stop.wait(0.01):
            send(ch, 3)  # ~300/s, about what the consumer takes
        conn.close()

    send(channel, 100)  # a standing backlog: 2% full
    threads = [threading.Thread(target=consumer), threading.Thread(target=publisher)]
    for thread in threads:
        thread.start()
    try:
        seen = 0
        for _ in range(2):
            # Each run on fresh management figures (RabbitMQ refreshes them every few seconds).
            q = wait_management(
                rabbit, lambda q, seen=seen: q.get("message_stats", {}).get("publish", 0) > seen, "new figures"
            )
            seen = q["message_stats"]["publish"]
            runs.monitor_queues()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    while (message := channel.basic_get(QUEUE, no_ack=True)) is not None:
        received.add(orjson.loads(message.body))
    assert received == set(range(next(published)))  # the direct count: nothing lost
    samples = list(QueueSample.objects.filter(queue=QUEUE))
    assert len(samples) == 2 and all(s.fill < 0.5 for s in samples), [(s.ready, s.fill) for s in samples]
    assert [s.dropped_estimate for s in samples] == [0, 0]
