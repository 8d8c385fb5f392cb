"""The circuit breaker stops connect storms, lets one probe through (always given back), and closes on success."""

from __future__ import annotations

import asyncio
import time

from streaming.bybit import BybitSocket, SocketConfig
from streaming.circuit import CircuitBreaker, ConnectionBudget, backoff_delay, circuits_snapshot

COOLDOWN = 0.2  # seconds


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


async def opened(breaker: CircuitBreaker) -> CircuitBreaker:
    for _ in range(breaker.threshold):
        await breaker.acquire()
        await breaker.failure()
    return breaker


def test_the_circuit_opens_after_n_failures_and_holds_attempts_for_the_cooldown() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker(3, 60.0, COOLDOWN)
        await breaker.failure()
        await breaker.failure()
        assert breaker.state == "closed"
        await breaker.failure()
        assert breaker.state == "open"
        assert breaker.snapshot()["next_attempt_at"] > time.time()
        started = time.monotonic()
        await breaker.acquire()
        assert time.monotonic() - started >= COOLDOWN * 0.9
        assert breaker.state == "half_open"

    run(scenario())


def test_failures_spread_wider_than_the_window_never_open_it() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker(2, 0.0, COOLDOWN)  # every earlier failure has left the window
        for _ in range(5):
            await breaker.failure()
        assert breaker.state == "closed"

    run(scenario())


def test_half_open_lets_exactly_one_probe_through_and_success_closes() -> None:
    async def scenario() -> None:
        breaker = await opened(CircuitBreaker(2, 60.0, COOLDOWN))
        attempts = [asyncio.create_task(breaker.acquire()) for _ in range(3)]
        done, waiting = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        late, _ = await asyncio.wait(waiting, timeout=COOLDOWN / 2)
        assert not late  # the others wait for the probe's result
        assert breaker.state == "half_open"
        await breaker.success()
        await asyncio.gather(*waiting)
        assert breaker.snapshot() == {"state": "closed", "recent_failures": 0, "next_attempt_at": None}

    run(scenario())


def test_a_failed_probe_opens_the_circuit_again() -> None:
    async def scenario() -> None:
        breaker = await opened(CircuitBreaker(5, 60.0, COOLDOWN))
        await breaker.acquire()
        assert breaker.state == "half_open"
        await breaker.failure()
        assert breaker.state == "open"
        waiter = asyncio.create_task(breaker.acquire())
        early, _ = await asyncio.wait({waiter}, timeout=COOLDOWN / 4)
        assert not early
        await waiter  # the next probe, after another cooldown
        assert breaker.state == "half_open"

    run(scenario())


def test_a_probe_given_up_without_a_result_lets_the_next_attempt_probe() -> None:
    async def scenario() -> None:
        breaker = await opened(CircuitBreaker(1, 60.0, COOLDOWN))
        async with breaker.attempt() as probe:
            assert probe and breaker.state == "half_open"
            waiting = asyncio.create_task(breaker.acquire())
        # Neither success() nor failure(): the attempt never happened (its socket was stopped).
        assert await asyncio.wait_for(waiting, COOLDOWN / 2)
        assert breaker.state == "half_open"

    run(scenario())


def test_a_late_release_never_frees_a_later_probe() -> None:
    async def scenario() -> None:
        breaker = await opened(CircuitBreaker(1, 60.0, COOLDOWN))
        first = await breaker.acquire()
        await breaker.failure()  # the first probe failed: open again
        second = await breaker.acquire()
        await breaker.release(first)
        third = asyncio.create_task(breaker.acquire())
        early, _ = await asyncio.wait({third}, timeout=COOLDOWN / 2)
        assert second != first and not early  # still one probe out: the second
        await breaker.success()
        assert await third == 0

    run(scenario())


SOCKET_CONFIG = SocketConfig(ping_interval=1, dead_after=3, connect_timeout=5, backoff_base=0.05, backoff_cap=0.5,
                             healthy_after=1, auth_retry_cap=1, max_frame_bytes=2**20)  # fmt: skip


def test_a_socket_stopped_in_the_tick_it_gets_the_probe_gives_the_probe_back() -> None:
    async def scenario() -> None:
        # Accepts TCP and never answers: a connect attempt would hang until stopped.
        silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{silent.sockets[0].getsockname()[1]}/v5/public/spot"
        breaker = await opened(CircuitBreaker(1, 60.0, COOLDOWN))
        sock = BybitSocket(
            "spot-1", url, "spot", SOCKET_CONFIG, breaker, ConnectionBudget(),
            on_frame=lambda raw, s: None, on_ack=lambda s, t: None, on_reject=lambda s, t, m: None,
        )  # fmt: skip
        running = asyncio.create_task(sock.run())
        while not breaker.probing:
            await asyncio.sleep(0)  # one loop tick at a time
        await sock.stop()
        await running
        # Another socket of the endpoint probes now, without waiting for a result that never comes.
        assert await asyncio.wait_for(breaker.acquire(), COOLDOWN)
        silent.close()

    run(scenario())


def test_the_status_shows_the_worst_circuit_and_each_endpoint() -> None:
    async def scenario() -> None:
        linear = await opened(CircuitBreaker(1, 60.0, COOLDOWN, "wss://x/v5/public/linear"))
        breakers = {"wss://x/v5/private": CircuitBreaker(1, 60.0, COOLDOWN), "wss://x/v5/public/linear": linear}
        worst, circuits = circuits_snapshot(breakers)
        assert (worst["state"], worst["endpoint"]) == ("open", "wss://x/v5/public/linear")
        assert {e: c["state"] for e, c in circuits.items()} == {
            "wss://x/v5/private": "closed",
            "wss://x/v5/public/linear": "open",
        }
        assert circuits_snapshot({})[0]["state"] == "closed"

    run(scenario())


def test_the_connection_budget_waits_once_the_limit_is_spent() -> None:
    async def scenario() -> None:
        budget = ConnectionBudget(limit=2, period=COOLDOWN)
        started = time.monotonic()
        await budget.acquire()
        await budget.acquire()
        assert time.monotonic() - started < COOLDOWN
        await budget.acquire()
        assert time.monotonic() - started >= COOLDOWN * 0.9

    run(scenario())


def test_backoff_grows_with_attempts_and_stays_under_the_cap() -> None:
    delays = [backoff_delay(attempt, 0.5, 10.0) for attempt in range(40) for _ in range(20)]
    assert all(0 <= d <= 10.0 for d in delays)
    assert max(backoff_delay(0, 0.5, 10.0) for _ in range(50)) <= 0.5
    assert max(delays) > 5.0  # jitter is uniform up to the cap, not stuck near the base
