"""The Bybit REST client against the simulator: pages, time windows, rate limits, retries, errors without secrets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from structlog.testing import capture_logs

from streaming.bybitrest import BybitRest, BybitRestError, base_url
from streaming.simulator import Simulator
from tests.simclient import with_simulator

KEY, SECRET = "rest-test-key", "rest-test-secret-never-shown"
EXECUTIONS = "/v5/execution/list"


def with_client(test: Callable[[Simulator, BybitRest], Awaitable[None]], **client_options: object) -> None:
    """Run an async test with a fresh simulator and a client pointed at its REST port, with test-sized backoff."""

    async def run(sim: Simulator) -> None:
        options = {"backoff_base": 0.01, "backoff_cap": 0.05, **client_options}
        async with BybitRest(sim.rest_url, KEY, SECRET, **options) as client:  # type: ignore[arg-type]
            await test(sim, client)

    with_simulator(run, credentials={KEY: SECRET})


def test_lists_every_open_order_across_pages_and_settle_coins() -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        usdt = {(await sim.emit_order(symbol="BTCUSDT"))["data"][0]["orderId"] for _ in range(120)}
        usdc = {(await sim.emit_order(symbol="ETHPERP"))["data"][0]["orderId"] for _ in range(3)}
        closed = (await sim.emit_order(symbol="BTCUSDT"))["data"][0]["orderId"]
        await sim.emit_order(orderId=closed, orderStatus="Cancelled")
        await sim.emit_order(symbol="BTCUSDT", category="spot")
        orders = await client.open_orders("linear")
        assert len(orders) == 123 and {o["orderId"] for o in orders} == usdt | usdc
        assert sim.rest.answered[("/v5/order/realtime", 0)] == 4  # 3 pages of USDT (50 a page), 1 of USDC
        assert [o["orderId"] for o in await client.recent_closed_orders("linear")] == [closed]

    with_client(test)


def test_collects_every_execution_since_a_time() -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        start = 1_790_000_000_000
        for i in range(130):
            await sim.emit_execution(execTime=str(start - 65 + i), execId=f"e-{i}")
        executions = await client.executions("linear", start_ms=start, end_ms=start + 1000)
        assert sorted(e["execId"] for e in executions) == sorted(f"e-{i}" for i in range(65, 130))
        assert len(executions) == 65

    with_client(test)


def test_asks_in_seven_day_windows_as_bybit_requires() -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        day = 86_400_000
        start = 1_790_000_000_000
        for i in range(3):
            await sim.emit_execution(execTime=str(start + i * 8 * day), execId=f"e-{i}")
        executions = await client.executions("linear", start_ms=start, end_ms=start + 20 * day)
        assert sorted(e["execId"] for e in executions) == ["e-0", "e-1", "e-2"]
        assert sim.rest.answered[(EXECUTIONS, 10001)] == 0

    with_client(test)


def test_order_history_is_asked_in_seven_day_windows_too() -> None:
    # A back-fill after a gateway was down for over a week asks for a span Bybit refuses in one go.
    async def test(sim: Simulator, client: BybitRest) -> None:
        day = 86_400_000
        start = 1_790_000_000_000
        for i in range(3):
            await sim.emit_order(createdTime=str(start + i * 8 * day), orderId=f"o-{i}", orderStatus="Filled")
        orders = await client.order_history("linear", start_ms=start, end_ms=start + 20 * day)
        assert sorted(o["orderId"] for o in orders) == ["o-0", "o-1", "o-2"]
        assert sim.rest.answered[("/v5/order/history", 10001)] == 0

    with_client(test)


def test_waits_out_a_rate_limit_instead_of_failing() -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        sim.rest.set_limits({EXECUTIONS: 2}, window=0.25)
        ids = {(await sim.emit_execution())["data"][0]["execId"] for _ in range(4)}
        # Three readers page one execution at a time, together far over 2 requests per 0.25 s.
        readers = [client.collect(EXECUTIONS, {"category": "linear", "limit": 1}) for _ in range(3)]
        results = await asyncio.gather(*readers)
        assert all({e["execId"] for e in result} == ids for result in results)
        assert sim.rest.answered[(EXECUTIONS, 10006)] >= 1  # refused at least once, and waited it out
        assert sim.rest.answered[(EXECUTIONS, 0)] == 12  # 4 pages each, none repeated

    with_client(test)


@pytest.mark.parametrize("mode", ["error", "http_5xx", "stall"])
def test_retries_a_transient_fault(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        await sim.emit_position(symbol="ETHUSDT")
        sim.rest.fail(mode, count=2, seconds=1.0)
        # caplog, not structlog's capture_logs: that misses a logger an earlier test already cached.
        with caplog.at_level(logging.WARNING, logger="streaming.bybitrest"):
            positions = await client.positions("linear", symbol="ETHUSDT")
        assert [p["symbol"] for p in positions] == ["ETHUSDT"]
        events = [r.msg["event"] for r in caplog.records if r.name == "streaming.bybitrest" and isinstance(r.msg, dict)]
        assert events == ["bybitrest.retry"] * 2

    with_client(test, timeout=0.3)


def test_gives_up_on_a_lasting_fault_with_a_transient_error() -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        sim.rest.fail("error", count=10)
        with pytest.raises(BybitRestError) as raised:
            await client.wallet_balance()
        assert (raised.value.ret_code, raised.value.transient) == (10016, True)
        assert sim.rest.answered[("/v5/account/wallet-balance", 10016)] == 3

    with_client(test, attempts=3)


@pytest.mark.parametrize(("key", "secret", "code"), [("unknown-key", SECRET, 10003), (KEY, "wrong-secret-xyz", 10004)])
def test_a_refused_key_raises_a_clear_error_that_never_shows_the_secret(key: str, secret: str, code: int) -> None:
    async def test(sim: Simulator) -> None:
        async with BybitRest(sim.rest_url, key, secret) as client:
            with capture_logs() as logs, pytest.raises(BybitRestError) as raised:
                await client.open_orders("spot")
            assert raised.value.ret_code == code and not raised.value.transient
            assert f"retCode {code}" in str(raised.value) and raised.value.ret_msg
            shown = [str(raised.value), repr(raised.value), repr(client), repr(logs)]
            assert not any(secret in text for text in shown)
        assert sum(n for (_, answer), n in sim.rest.answered.items() if answer == code) == 1  # not retried

    with_simulator(test, credentials={KEY: SECRET})


def test_wallet_balance_returns_the_latest_account() -> None:
    async def test(sim: Simulator, client: BybitRest) -> None:
        assert await client.wallet_balance() == []
        await sim.emit_wallet(totalEquity="1")
        await sim.emit_wallet(totalEquity="2")
        (account,) = await client.wallet_balance(coin="USDT")
        assert (account["accountType"], account["totalEquity"]) == ("UNIFIED", "2")

    with_client(test)


def test_base_url_follows_the_environment_unless_set() -> None:
    assert base_url("mainnet") == "https://api.bybit.com"
    assert base_url("testnet") == "https://api-testnet.bybit.com"
    assert base_url("demo") == "https://api-demo.bybit.com"
    assert base_url("simulator", simulator=("10.0.0.5", 9000)) == "http://10.0.0.5:9001"  # its control port
    assert base_url("mainnet", "http://proxy.local:8080/") == "http://proxy.local:8080"


def test_from_settings_points_at_the_configured_url(settings) -> None:
    settings.BYBIT_ENVIRONMENT, settings.BYBIT_REST_URL = "testnet", ""
    settings.BYBIT_API_KEY, settings.BYBIT_API_SECRET = KEY, SECRET
    client = BybitRest.from_settings(settings)
    assert client.url == "https://api-testnet.bybit.com" and SECRET not in repr(client)
    asyncio.run(client.aclose())
