"""One gateway owns the sockets; a standby takes over when the owner stops renewing."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from django.conf import settings

from streaming.lock import OwnerLock
from tests.relay import TcpRelay


def run(coro):
    return asyncio.run(coro)


async def pair(key: str, ttl: float) -> tuple[aioredis.Redis, OwnerLock, OwnerLock]:
    client = aioredis.from_url(settings.REDIS_URL)
    epoch_key = key + ":epoch"
    return client, OwnerLock(client, key, epoch_key, ttl), OwnerLock(client, key, epoch_key, ttl)


def redis_address() -> tuple[str, int]:
    parts = urlsplit(settings.REDIS_URL)
    return parts.hostname or "127.0.0.1", parts.port or 6379


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


def test_an_owner_cut_off_from_redis_fences_itself_before_a_standby_can_take_over(redis_prefix: str) -> None:
    """Split brain: the owner cannot renew (a network partition), the standby waits out the TTL."""
    ttl = 1.0
    relay = TcpRelay(*redis_address())

    async def scenario() -> tuple[object, float, float]:
        cut_off = aioredis.from_url(relay.url(), socket_timeout=5, socket_connect_timeout=5)
        direct = aioredis.from_url(settings.REDIS_URL)
        owner = OwnerLock(cut_off, redis_prefix + "lock", redis_prefix + "epoch", ttl)
        standby = OwnerLock(direct, redis_prefix + "lock", redis_prefix + "epoch", ttl)
        loop = asyncio.get_running_loop()
        assert await owner.acquire()
        holding = asyncio.create_task(owner.hold(asyncio.Event()))
        await asyncio.sleep(ttl)  # a few renewals go through
        relay.partition()
        while not await standby.acquire():
            await asyncio.sleep(0.01)
        took_over_at = loop.time()
        done, _ = await asyncio.wait({holding}, timeout=3 * ttl)
        outcome = holding.result() if done else "still serving"
        holding.cancel()
        stopped_at = getattr(owner, "fenced_at", float("inf"))
        await direct.aclose()
        return outcome, stopped_at, took_over_at

    try:
        outcome, stopped_at, took_over_at = run(scenario())
    finally:
        relay.close()
    assert outcome == "fenced"
    assert stopped_at < took_over_at  # never two owners at once


def test_every_acquire_raises_the_fencing_epoch(redis_prefix: str) -> None:
    async def scenario() -> list[int]:
        client, first, second = await pair(redis_prefix + "lock", 5)
        await first.acquire()
        epochs = [first.epoch]
        await first.release()
        await second.acquire()
        epochs.append(second.epoch)
        await second.release()
        await first.acquire()
        epochs.append(first.epoch)
        await client.aclose()
        return epochs

    first, second, third = run(scenario())
    assert 0 < first < second < third
