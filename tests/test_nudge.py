"""Creating or cancelling a subscription tells the gateway at once, over RabbitMQ."""

from __future__ import annotations

import orjson
import pytest
import structlog
from rest_framework.test import APIClient

from streaming.publisher import connect
from subscriptions.topics import CONTROL_EXCHANGE, CONTROL_ROUTING_KEY

pytestmark = pytest.mark.django_db

URL = "/api/v1/subscriptions"


@pytest.fixture
def control_queue(rabbit: str):
    conn = connect(rabbit)
    channel = conn.channel()
    channel.exchange_declare(CONTROL_EXCHANGE, "topic", durable=True, auto_delete=False)
    queue = channel.queue_declare("", exclusive=True).queue
    channel.queue_bind(queue, CONTROL_EXCHANGE, CONTROL_ROUTING_KEY)

    def read() -> list[dict]:
        messages = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(orjson.loads(message.body))
        return messages

    yield read
    conn.close()


def test_create_and_cancel_publish_a_nudge_after_commit(
    api_client: APIClient, control_queue, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        created = api_client.post(URL, {"channel": "order"}, format="json").json()
    with django_capture_on_commit_callbacks(execute=True):
        api_client.delete(f"{URL}/{created['id']}")
    from tests.conftest import wait_for

    messages: list[dict] = []
    wait_for(lambda: messages.extend(control_queue()) or len(messages) >= 2, message="two nudges")
    assert [(m["event"], m["reason"], m["subscription_ids"]) for m in messages] == [
        ("subscriptions.changed", "created", [created["id"]]),
        ("subscriptions.changed", "cancelled", [created["id"]]),
    ]


def test_a_second_identical_post_sends_no_nudge(
    api_client: APIClient, control_queue, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as first:
        api_client.post(URL, {"channel": "order"}, format="json")
    with django_capture_on_commit_callbacks(execute=True) as second:
        api_client.post(URL, {"channel": "order"}, format="json")
    assert (len(first), len(second)) == (1, 0)


def test_broker_down_still_answers_201_and_logs_the_failed_nudge(
    api_client: APIClient, settings, django_capture_on_commit_callbacks
) -> None:
    settings.RABBITMQ_URL = "amqp://guest:secretpw@127.0.0.1:1//"
    with structlog.testing.capture_logs() as logs, django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(URL, {"channel": "order"}, format="json")
    assert response.status_code == 201
    (failed,) = [entry for entry in logs if entry["event"] == "gateway.nudge_failed"]
    assert "secretpw" not in str(failed)
