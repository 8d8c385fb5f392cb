"""Single ownership of the Bybit sockets: a Redis lock with a short TTL, held while healthy.

A standby `run_gateway` polls the lock and takes over within one TTL of the owner dying,
`kill -9` included, because nobody renews the key. Renew and release are compare-and-set
scripts on a random token, so an instance that lost the lock can never extend or delete
its successor's.
"""

from __future__ import annotations

import asyncio
import os
import socket

import redis.asyncio as redis
import structlog

from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class OwnerLock:
    def __init__(self, client: redis.Redis, key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.ttl_ms = int(ttl * 1000)
        self.throttle = LogThrottle()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(8).hex()}"
        self.renew_script = client.register_script(RENEW)
        self.release_script = client.register_script(RELEASE)

    async def acquire(self) -> bool:
        return bool(await self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        """Extend the TTL; False means the lock was lost (expired and maybe taken)."""
        return bool(await self.renew_script(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def release(self) -> None:
        await self.release_script(keys=[self.key], args=[self.token])

    async def holder(self) -> str | None:
        value = await self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    async def wait(self, stop: asyncio.Event) -> bool:
        """Wait as standby until this instance holds the lock; False if stopped first."""
        announced = False
        while not stop.is_set():
            try:
                if await self.acquire():
                    log.info("gateway.lock_acquired", key=self.key)
                    return True
                if not announced:
                    log.info("gateway.standby", holder=await self.holder(), key=self.key)
                    announced = True
            except (redis.RedisError, OSError) as exc:
                if self.throttle.allow("lock") is not None:
                    log.warning("gateway.lock_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
            await wait_or_timeout(stop, self.ttl / 5)
        return False

    async def hold(self, stop: asyncio.Event) -> bool:
        """Renew the lock every third of its TTL until `stop`; False as soon as another instance holds it."""
        while not stop.is_set():
            await wait_or_timeout(stop, self.ttl / 3)
            try:
                if await self.renew() or await self.acquire():
                    continue
                log.error("gateway.lock_lost", holder=await self.holder())
                return False
            except (redis.RedisError, OSError) as exc:
                # Nobody can take the lock while Redis is away; keep serving and retry.
                if self.throttle.allow("lock") is not None:
                    log.warning("gateway.lock_renew_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        return True


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Return when `event` is set or after `seconds`, whichever comes first."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
