"""The circuit breaker stops connect storms, lets one probe through, and closes on success."""

from __future__ import annotations

import asyncio
import time

from streaming.circuit import CircuitBreaker, ConnectionBudget, backoff_delay

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
