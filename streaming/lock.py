"""Single ownership of the Bybit sockets: a Redis lock with a short TTL, renewed while healthy.

A standby `run_gateway` polls the lock and takes over within one TTL of the owner dying,
`kill -9` included, because nobody renews the key. Renew and release are compare-and-set
scripts on a random token, so an instance that lost the lock can never extend or delete
its successor's.
"""

from __future__ import annotations

import os
import socket

import redis.asyncio as redis

RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class OwnerLock:
    def __init__(self, client: redis.Redis, key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl * 1000)
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
