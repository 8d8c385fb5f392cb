"""One gateway owns the sockets; a standby takes over when the owner stops renewing."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from django.conf import settings

from streaming.lock import OwnerLock


def run(coro):
    return asyncio.run(coro)


async def pair(key: str, ttl: float) -> tuple[aioredis.Redis, OwnerLock, OwnerLock]:
    client = aioredis.from_url(settings.REDIS_URL)
    return client, OwnerLock(client, key, ttl), OwnerLock(client, key, ttl)


def test_second_instance_waits_while_the_owner_renews(redis_prefix: str) -> None:
    async def scenario() -> tuple[bool, bool, bool, bool]:
        client, owner, standby = await pair(redis_prefix + "lock", 0.5)
        first = await owner.acquire()
        second = await standby.acquire()
        renewed = await owner.renew()
        still_out = await standby.acquire()
        await client.aclose()
        return first, second, renewed, still_out

    assert run(scenario()) == (True, False, True, False)


def test_standby_takes_over_when_the_owner_dies(redis_prefix: str) -> None:
    async def scenario() -> tuple[bool, bool]:
        client, owner, standby = await pair(redis_prefix + "lock", 0.3)
        await owner.acquire()
        # The owner dies without releasing (kill -9): nobody renews, the key expires.
        deadline = asyncio.get_running_loop().time() + 3
        while not await standby.acquire():
            assert asyncio.get_running_loop().time() < deadline, "standby never took over"
            await asyncio.sleep(0.05)
        revived = await owner.renew()
        await client.aclose()
        return True, revived

    took_over, revived = run(scenario())
    assert took_over
    assert not revived  # the old owner cannot extend its successor's lock


def test_release_only_frees_our_own_lock(redis_prefix: str) -> None:
    async def scenario() -> tuple[bool, bool]:
        client, owner, other = await pair(redis_prefix + "lock", 5)
        await owner.acquire()
        await other.release()  # not its lock: no effect
        blocked = not await other.acquire()
        await owner.release()
        free = await other.acquire()
        await client.aclose()
        return blocked, free

    assert run(scenario()) == (True, True)
