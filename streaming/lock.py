"""Single ownership of the Bybit sockets: a self-fencing Redis lease with a fencing epoch.

A standby `run_gateway` polls the lock and takes over within one TTL of the owner dying,
`kill -9` included, because nobody renews the key. Renew and release are compare-and-set
scripts on a random token, so an instance that lost the lock can never extend or delete
its successor's. Every acquire also increments `<prefix>gateway:epoch` in the same script:
the fencing epoch, carried by every event an owner publishes, only ever grows.

Self-fencing: an owner that cannot prove it holds the lock (a renew Redis confirmed) stops
before a standby could take it. It renews every quarter TTL; FENCE_AFTER of the TTL after the
last proof it gives up (`hold` returns "fenced"), and it must publish nothing after
SERVE_UNTIL of the TTL. The key expires a full TTL after Redis applied that renew, and the
proof is dated when the renew was sent, before Redis applied it: the margins hold whatever
the network delay.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import redis.asyncio as redis
import structlog

from wsgateway.logging import LogThrottle

if TYPE_CHECKING:
    from streaming.gateway import Gateway

log = structlog.get_logger(__name__)

# SET NX and INCR in one script: an epoch exists for every acquire, and only for one.
ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return redis.call('incr', KEYS[2]) end
return 0
"""
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

RENEW_EVERY = 0.25  # of the TTL
RETRY_EVERY = 0.1  # of the TTL, after a renew that failed
FENCE_AFTER = 0.7  # of the TTL since the last proof: stop reading, hold returns "fenced"
SERVE_UNTIL = 0.9  # of the TTL since the last proof: nothing may be published after this

Outcome = Literal["stopped", "lost", "fenced"]


class OwnerLock:
    def __init__(self, client: redis.Redis, key: str, epoch_key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.epoch_key = epoch_key
        self.ttl = ttl
        self.ttl_ms = int(ttl * 1000)
        self.throttle = LogThrottle()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(8).hex()}"
        self.acquire_script = client.register_script(ACQUIRE)
        self.renew_script = client.register_script(RENEW)
        self.release_script = client.register_script(RELEASE)
        self.epoch = 0  # of the lease this instance holds or held last
        self.proven_at = 0.0  # monotonic time the last acquire or renew Redis confirmed was sent
        self.fenced_at: float | None = None
        self.released = False

    @property
    def serve_until(self) -> float:
        """Monotonic time after which this instance must publish nothing: a standby may own the lock soon after."""
        return self.proven_at + self.ttl * SERVE_UNTIL

    async def acquire(self) -> bool:
        """Take the lock if it is free, with a new epoch."""
        sent = time.monotonic()
        epoch = int(await self.acquire_script(keys=[self.key, self.epoch_key], args=[self.token, self.ttl_ms]))
        if epoch:
            self.epoch, self.proven_at = epoch, sent
        return bool(epoch)

    async def renew(self) -> bool:
        """Extend the TTL; False means the lock was lost (expired and maybe taken)."""
        sent = time.monotonic()
        renewed = bool(await self.renew_script(keys=[self.key], args=[self.token, self.ttl_ms]))
        if renewed:
            self.proven_at = sent
        return renewed

    async def release(self) -> None:
        await self.release_script(keys=[self.key], args=[self.token])
        self.released = True

    async def holder(self) -> str | None:
        value = await self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    async def wait(self, stop: asyncio.Event) -> bool:
        """Wait as standby until this instance holds the lock; False if stopped first."""
        announced = False
        while not stop.is_set():
            try:
                if await self.acquire():
                    log.info("gateway.lock_acquired", key=self.key, epoch=self.epoch)
                    return True
                if not announced:
                    log.info("gateway.standby", holder=await self.holder(), key=self.key)
                    announced = True
            except (redis.RedisError, OSError) as exc:
                if self.throttle.allow("lock") is not None:
                    log.warning("gateway.lock_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
            await wait_or_timeout(stop, self.ttl / 5)
        return False

    async def hold(self, stop: asyncio.Event, on_epoch: Callable[[int], None] | None = None) -> Outcome:
        """Renew the lock every quarter TTL until `stop`.

        Return "stopped" when `stop` was set, "lost" as soon as another instance holds the lock,
        "fenced" when no renew could be proven for FENCE_AFTER of the TTL (Redis unreachable or
        too slow): the caller must stop reading now and publish nothing after `serve_until`.
        A key that vanished (Redis restarted empty) is taken again, with a new epoch for `on_epoch`.
        """
        delay = self.ttl * RENEW_EVERY
        while True:
            fence_at = self.proven_at + self.ttl * FENCE_AFTER
            await wait_or_timeout(stop, max(0.0, min(delay, fence_at - time.monotonic())))
            if stop.is_set():
                return "stopped"
            now = time.monotonic()
            if now >= fence_at:
                self.fenced_at = now
                log.error("gateway.lock_fenced", since_proof=round(now - self.proven_at, 3), epoch=self.epoch)
                return "fenced"
            epoch = self.epoch
            try:
                # Bounded by the fence: a renew stuck on a dead connection must not outlive the lease.
                held = await asyncio.wait_for(self.renew_or_retake(), min(self.ttl * RENEW_EVERY, fence_at - now))
            except (redis.RedisError, OSError, TimeoutError) as exc:
                delay = self.ttl * RETRY_EVERY
                if self.throttle.allow("lock") is not None:
                    log.warning(
                        "gateway.lock_renew_failed",
                        error=f"{type(exc).__name__}: {exc}"[:200],
                        fence_in=round(fence_at - time.monotonic(), 3),
                    )
                continue
            if not held:
                try:
                    holder = await asyncio.wait_for(self.holder(), self.ttl * RENEW_EVERY)
                except (redis.RedisError, OSError, TimeoutError):
                    holder = None
                log.error("gateway.lock_lost", holder=holder, epoch=self.epoch)
                return "lost"
            delay = self.ttl * RENEW_EVERY
            if self.epoch != epoch:
                log.warning("gateway.lock_retaken", epoch=self.epoch)
                if on_epoch is not None:
                    on_epoch(self.epoch)

    async def renew_or_retake(self) -> bool:
        return await self.renew() or await self.acquire()


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Return when `event` is set or after `seconds`, whichever comes first."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


class Lease:
    """The gateway's side of ownership: keep the lock, stop publishing when it is lost, hand over."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.publishing: asyncio.Task[None] | None = None  # the publisher's task, ended when the lease ends
        self.serve_until: float | None = None  # monotonic: publish nothing after it (the lease is ending)

    def new_epoch(self, epoch: int) -> None:
        """Events read from now on carry this lease's fencing epoch."""
        self.gateway.envelopes.epoch = epoch

    async def keep(self) -> None:
        """Keep the lease; when it is lost or fenced, stop, and publish nothing once a standby may own it."""
        gw = self.gateway
        outcome = await gw.lock.hold(gw.stop_event, self.new_epoch)
        if outcome == "stopped":
            return
        # Lost: another instance owns the lock already. Fenced: it may, from the TTL's end on.
        self.serve_until = time.monotonic() if outcome == "lost" else gw.lock.serve_until
        asyncio.get_running_loop().call_later(max(0.0, self.serve_until - time.monotonic()), self.stop_publishing)
        gw.exit_code = 3
        gw.stop_event.set()

    def stop_publishing(self) -> None:
        """End the publisher at once, whatever is unconfirmed: shutdown reports what was left."""
        gw = self.gateway
        if self.publishing is not None and not self.publishing.done():
            self.publishing.cancel()
            gw.publisher.close()
            log.warning("gateway.publishing_stopped", in_flight=gw.publisher.in_flight, handoff_depth=len(gw.handoff))

    async def flush(self, deadline: float) -> bool:
        """Wait for the publisher's confirms; hand over first if that takes long. Return True when all came back.

        A slow broker must not keep the lock: after `handover_flush` s the lock goes to the
        standby, which back-fills from the watermark what this owner is still confirming.
        """
        gw = self.gateway
        budget = max(0.5, deadline - time.monotonic() - 0.5)
        if self.serve_until is not None:
            budget = self.serve_until - time.monotonic()
        if await gw.publisher.flush(min(budget, gw.config.handover_flush)):
            return True
        if gw.exit_code == 3:  # the lease is lost or fenced: nothing may be published after serve_until
            return False
        await self.hand_over()
        return await gw.publisher.flush(max(0.0, deadline - time.monotonic() - 0.5))

    async def hand_over(self) -> None:
        """Write the last status record and the watermark, then release the lock for the standby."""
        gw = self.gateway
        try:
            await gw.status_writer.write(gw.status())
            await gw.recovery.save(gw.redis)
            await gw.lock.release()
        except (redis.RedisError, OSError) as exc:
            log.warning("gateway.handover_failed", error=f"{type(exc).__name__}: {exc}"[:200])
