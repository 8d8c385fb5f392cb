"""Politeness to Bybit shared by every socket: the circuit breaker, the connection budget, jittered backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


class CircuitBreaker:
    """Opens after `failures` consecutive connect failures within `window` s; one probe after `cooldown`."""

    def __init__(self, failures: int, window: float, cooldown: float) -> None:
        self.threshold = failures
        self.window = window
        self.cooldown = cooldown
        self.state = "closed"
        self.failures: deque[float] = deque()
        self.opened_until = 0.0
        self.probing = False
        self.changed = asyncio.Condition()

    async def acquire(self) -> None:
        """Wait until a connection attempt is allowed."""
        async with self.changed:
            while True:
                if self.state == "closed":
                    return
                if self.state == "open":
                    remaining = self.opened_until - time.monotonic()
                    if remaining > 0:
                        try:
                            await asyncio.wait_for(self.changed.wait(), remaining)
                        except TimeoutError:
                            pass
                        continue
                    self.state = "half_open"
                    log.info("circuit.half_open")
                if not self.probing:
                    self.probing = True
                    return
                await self.changed.wait()

    async def success(self) -> None:
        async with self.changed:
            if self.state != "closed":
                log.info("circuit.closed")
            self.state, self.probing = "closed", False
            self.failures.clear()
            self.changed.notify_all()

    async def failure(self) -> None:
        async with self.changed:
            now = time.monotonic()
            self.failures.append(now)
            while self.failures and now - self.failures[0] > self.window:
                self.failures.popleft()
            if self.state == "half_open" or len(self.failures) >= self.threshold:
                self.state, self.probing = "open", False
                self.opened_until = now + self.cooldown
                next_attempt = time.time() + self.cooldown
                log.warning("circuit.open", failures=len(self.failures), next_attempt_at=round(next_attempt, 3))
            self.changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        remaining = max(0.0, self.opened_until - time.monotonic()) if self.state == "open" else 0.0
        return {
            "state": self.state,
            "recent_failures": len(self.failures),
            "next_attempt_at": round(time.time() + remaining, 3) if self.state == "open" else None,
        }


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
