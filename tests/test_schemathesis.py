"""The OpenAPI schema is the API: schemathesis, every check and every phase, finds nothing.

Runs the schemathesis CLI (as a user would, `st run .../api/schema/`) against the live server,
once with a service key and once with the operator key. Bounded: few examples per operation,
deterministic generation, a time budget per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import redis
from django.conf import settings
from django.utils import timezone

from streaming.marketstate import book_key, ticker_key
from streaming.models import AccountBalance, QueueSample
from subscriptions.services import api_key_issue, subscription_create

pytestmark = pytest.mark.django_db(transaction=True)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_TIME = 22  # seconds per run
SERVICE = "demo"  # the service the schema's examples name (ws-gateway.demo.trade)

CONFIG = """
# Every check (the CLI's --checks would override the per-operation section below).
[checks]
enabled = true

# gunicorn refuses request lines over 4094 bytes with a 414 (documented on every operation), and
# that is a rejection too; the live server here has a longer limit, so it matters for deployments.
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 414, 415, 422, 428, 429, "5xx"]

[generation]
max-examples = 8
deterministic = true

[phases]
examples.enabled = true
coverage.enabled = true
fuzzing.enabled = true
# Error feedback (for every phase) reads DRF's bare error shape; ours nests it under "fields", so it
# "learns" a body property named `fields`, then counts bodies carrying it as valid. Generation only.
fuzzing.error-feedback.enabled = false
stateful.enabled = true

# DELETE /subscriptions/{id} cancels: the row stays readable with status "cancelled" (README,
# "Keys and errors"), as Stripe's DELETE /v1/subscriptions/{id} does. use_after_free expects a 404
# there; every other check runs on this operation, and every check on all the others.
[[operations]]
include-path = "/api/v1/subscriptions/{id}"
include-method = "GET"
checks.use_after_free.enabled = false
"""

# The operator key must name the service it acts for; JSON Schema cannot make a field required
# for one caller only, so the operator's generated bodies name one.
OPERATOR_HOOKS = f"""
import schemathesis


@schemathesis.hook
def map_case(context, case):
    if isinstance(case.body, dict) and "service_name" not in case.body and case.method.upper() == "POST":
        case.body["service_name"] = {SERVICE!r}
    return case
"""


@pytest.fixture
def market_data(redis_prefix: str, rabbit: str) -> None:
    """What the read endpoints serve, so their 200 responses are checked too: a book, a ticker, queues, balances."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    now = time.time()
    book = {"b": [["65000.5", "1.2"]], "a": [["65001", "0.4"]], "u": 7, "seq": 9, "consistent": True, "depth": 50}
    client.hset(
        *book_key(redis_prefix, "linear", "BTCUSDT", 50), orjson.dumps({**book, "exchange_ts": None, "written_at": now})
    )
    ticker = {"data": {"symbol": "BTCUSDT", "lastPrice": "65000.5"}, "exchange_ts": int(now * 1000), "written_at": now}
    client.hset(*ticker_key(redis_prefix, "linear", "BTCUSDT"), orjson.dumps(ticker))
    client.close()
    for event_class, ready in (("trade", 12), ("order", 0)):
        QueueSample.objects.create(
            queue=f"ws-gateway.{SERVICE}.{event_class}",
            service_name=SERVICE,
            event_class=event_class,
            taken_at=timezone.now(),
            source="management",
            ready=ready,
            unacked=None if ready else 0,
            consumers=1,
            max_length=100_000,
            fill=ready / 100_000,
            publish_rate=3.5,
            alerts=[],
        )
    AccountBalance.objects.create(
        account_type="UNIFIED", coin="USDT", wallet_balance=Decimal("1000.5"), exchange_ts=timezone.now()
    )
    subscription_create(service_name=SERVICE, channel="trades", category="linear", symbol="BTCUSDT")


def run(url: str, key: str, tmp_path: Path, hooks: str = "") -> subprocess.CompletedProcess[str]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    if hooks:
        hooks_file = tmp_path / "hooks.py"
        hooks_file.write_text(hooks)
        env["SCHEMATHESIS_HOOKS"] = str(hooks_file)
    command = [
        str(SCHEMATHESIS), "--config-file", str(config), "run", f"{url}/api/schema/",
        "--header", f"X-API-Key: {key}", "--workers", "1", "--max-time", str(MAX_TIME),
        "--no-color", "--report-dir", str(tmp_path / "report"),
    ]  # fmt: skip
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=MAX_TIME * 4)


def report(result: subprocess.CompletedProcess[str]) -> str:
    """The failures schemathesis found, for the assertion message."""
    output = result.stdout
    start = output.find("FAILURES")
    return (output[start:] if start >= 0 else output)[:12_000] + result.stderr[-2000:]


def test_schemathesis_finds_nothing_with_a_service_key(live_server, market_data, tmp_path: Path) -> None:
    key = api_key_issue(service_name=SERVICE)[1]
    result = run(live_server.url, key, tmp_path)
    assert result.returncode == 0, report(result)


def test_schemathesis_finds_nothing_with_the_operator_key(live_server, market_data, settings, tmp_path) -> None:
    settings.WS_GATEWAY_API_KEY = "wsg_operator_schemathesis_0123456789abcdef"
    result = run(live_server.url, settings.WS_GATEWAY_API_KEY, tmp_path, hooks=OPERATOR_HOOKS)
    assert result.returncode == 0, report(result)
