"""Politeness to Bybit: a circuit breaker per endpoint, the connection budget all sockets share, jittered backoff."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog

log = structlog.get_logger(__name__)

SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


class CircuitBreaker:
    """Opens after `failures` consecutive connect failures within `window` s; one probe after `cooldown`.

    Every attempt goes through `attempt()`, which reports nothing by itself: the caller says
    `success()` or `failure()`. A probe the caller never reports on (it was stopped or
    cancelled first) is given back when `attempt()` exits, so the next waiter probes instead.
    """

    def __init__(self, failures: int, window: float, cooldown: float, endpoint: str = "") -> None:
        self.threshold = failures
        self.window = window
        self.cooldown = cooldown
        self.endpoint = endpoint
        self.state = "closed"
        self.failures: deque[float] = deque()
        self.opened_until = 0.0
        self.probing = 0  # the number of the probe out now, 0 when none
        self.probes = itertools.count(1)
        self.changed = asyncio.Condition()

    async def acquire(self) -> int:
        """Wait until a connection attempt is allowed; return the probe's number if it is the half-open probe, else 0.

        A probe must be settled with `success()`, `failure()` or `release(number)`.
        """
        async with self.changed:
            while True:
                if self.state == "closed":
                    return 0
                if self.state == "open":
                    remaining = self.opened_until - time.monotonic()
                    if remaining > 0:
                        try:
                            await asyncio.wait_for(self.changed.wait(), remaining)
                        except TimeoutError:
                            pass
                        continue
                    self.state = "half_open"
                    log.info("circuit.half_open", endpoint=self.endpoint)
                if not self.probing:
                    self.probing = next(self.probes)
                    return self.probing
                await self.changed.wait()

    async def release(self, probe: int) -> None:
        """Give back probe `probe` if nobody settled it: the attempt never happened."""
        async with self.changed:
            if probe and self.probing == probe:
                self.probing = 0
                self.changed.notify_all()

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[int]:
        """Hold the right to one connection attempt (see `acquire`); an unsettled probe is released on exit."""
        probe = await self.acquire()
        try:
            yield probe
        finally:
            if probe:
                # Shielded: this runs while the attempt is being cancelled, and must finish.
                await asyncio.shield(self.release(probe))

    async def success(self) -> None:
        async with self.changed:
            if self.state != "closed":
                log.info("circuit.closed", endpoint=self.endpoint)
            self.state, self.probing = "closed", 0
            self.failures.clear()
            self.changed.notify_all()

    async def failure(self) -> None:
        async with self.changed:
            now = time.monotonic()
            self.failures.append(now)
            while self.failures and now - self.failures[0] > self.window:
                self.failures.popleft()
            if self.state == "half_open" or len(self.failures) >= self.threshold:
                self.state, self.probing = "open", 0
                self.opened_until = now + self.cooldown
                next_attempt = time.time() + self.cooldown
                log.warning(
                    "circuit.open",
                    endpoint=self.endpoint,
                    failures=len(self.failures),
                    next_attempt_at=round(next_attempt, 3),
                )
            self.changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        remaining = max(0.0, self.opened_until - time.monotonic()) if self.state == "open" else 0.0
        return {
            "state": self.state,
            "recent_failures": len(self.failures),
            "next_attempt_at": round(time.time() + remaining, 3) if self.state == "open" else None,
        }


class Breakers(dict[str, CircuitBreaker]):
    """One breaker per endpoint URL, made on first use: failures of one path never delay another."""

    def __init__(self, failures: int, window: float, cooldown: float) -> None:
        super().__init__()
        self.settings = (failures, window, cooldown)

    def __missing__(self, url: str) -> CircuitBreaker:
        self[url] = breaker = CircuitBreaker(*self.settings, endpoint=url)
        return breaker


def circuits_snapshot(breakers: dict[str, CircuitBreaker]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the worst breaker's snapshot, with its endpoint; every breaker's snapshot by endpoint)."""
    circuits = {endpoint: breaker.snapshot() for endpoint, breaker in sorted(breakers.items())}
    if not circuits:
        return {"state": "closed", "recent_failures": 0, "next_attempt_at": None, "endpoint": None}, circuits
    endpoint = max(circuits, key=lambda e: (SEVERITY[circuits[e]["state"]], circuits[e]["recent_failures"]))
    return {**circuits[endpoint], "endpoint": endpoint}, circuits


class ConnectionBudget:
    """Bybit asks for at most 500 new connections per 5 minutes; wait rather than exceed it."""

    def __init__(self, limit: int = 500, period: float = 300.0) -> None:
        self.limit = limit
        self.period = period
        self.attempts: deque[float] = deque()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            while self.attempts and now - self.attempts[0] > self.period:
                self.attempts.popleft()
            if len(self.attempts) < self.limit:
                self.attempts.append(now)
                return
            wait = self.period - (now - self.attempts[0])
            log.warning("bybit.connection_budget_exhausted", wait=round(wait, 1))
            await asyncio.sleep(wait)
