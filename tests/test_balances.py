"""Balances are upserted newest-first, exactly, and survive a database outage."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.conf import settings

from streaming.balances import BalanceWriter, rows_from_wallet
from streaming.gateway import database_conninfo
from streaming.models import AccountBalance
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def wallet(ts: int, balance: str, coin: str = "BTC") -> list[dict]:
    item = {"accountType": "UNIFIED", "totalEquity": "1", "coin": [{"coin": coin, "walletBalance": balance}]}
    return rows_from_wallet(item, ts)


def written(coin: str = "BTC") -> Decimal | None:
    row = AccountBalance.objects.filter(account_type="UNIFIED", coin=coin).first()
    return row.wallet_balance if row else None


def test_an_older_event_never_overwrites_a_newer_one() -> None:
    writer = BalanceWriter(database_conninfo(settings.DATABASES["default"]))
    writer.write(wallet(2_000, "2.5"))
    writer.write(wallet(1_000, "1.0"))  # arrives late
    assert written() == Decimal("2.5")
    writer.write(wallet(3_000, "0.000000000000000001"))
    assert written() == Decimal("0.000000000000000001")
    writer.conn.close()


def test_offer_keeps_only_the_newest_pending_value_per_coin() -> None:
    writer = BalanceWriter("")
    for ts, value in ((2, "2"), (3, "3"), (1, "1")):
        writer.offer(wallet(ts, value)[0])
    (pending,) = writer.pending.values()
    assert pending["wallet_balance"] == Decimal("3")


class Proxy:
    """A TCP proxy to PostgreSQL that a test can cut (every connection dropped, none accepted) and restore."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.pairs: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(8)
        threading.Thread(target=self.accept, args=(self.server,), daemon=True).start()

    def accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.pairs += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        assert self.server is not None
        try:  # wakes the thread blocked in accept(); close() alone leaves the port accepting
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for sock in self.pairs:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.pairs.clear()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    db = settings.DATABASES["default"]
    proxy = Proxy((db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)))
    yield proxy
    proxy.cut()


def test_a_database_outage_loses_no_balance(proxy: Proxy) -> None:
    db = {**settings.DATABASES["default"], "HOST": "127.0.0.1", "PORT": proxy.port}
    writer = BalanceWriter(database_conninfo(db), backoff_cap=0.3)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(writer.run(stop)), daemon=True)
    thread.start()
    offer = lambda rows: loop.call_soon_threadsafe(writer.offer, rows[0])  # noqa: E731

    offer(wallet(1_000, "1"))
    wait_for(lambda: written() == Decimal("1"), message="the first write")
    proxy.cut()
    for ts in range(2_000, 2_010):
        offer(wallet(ts, str(ts)))
        offer(wallet(ts, str(ts), coin="ETH"))
    wait_for(lambda: writer.failures >= 2, message="the writer to notice the outage")
    assert written() == Decimal("1") and len(writer.pending) == 2
    proxy.restore()
    wait_for(lambda: written() == Decimal("2009") and written("ETH") == Decimal("2009"), timeout=10,
             message="every coin equal to its last event after the database came back")  # fmt: skip
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


def run_writer(writer: BalanceWriter) -> tuple[asyncio.AbstractEventLoop, asyncio.Event, threading.Thread]:
    """The writer's run() on its own loop in a thread, as the gateway runs it."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(writer.run(stop)), daemon=True)
    thread.start()
    return loop, stop, thread


def test_the_database_options_reach_the_balance_connection() -> None:
    """DATABASES OPTIONS (sslmode, connect_timeout, ...) apply to the writer's own connection too."""
    db = {**settings.DATABASES["default"], "OPTIONS": {"sslmode": "require", "isolation_level": 1}}
    writer = BalanceWriter(database_conninfo(db))
    writer.offer(wallet(1_000, "1")[0])
    assert not asyncio.run(writer.flush())  # the local server has no TLS: sslmode=require was used
    assert "SSL" in writer.last_error
    db["OPTIONS"] = {"sslmode": "disable", "connect_timeout": 2}
    writer = BalanceWriter(database_conninfo(db))
    writer.offer(wallet(1_000, "1")[0])
    assert asyncio.run(writer.flush())
    assert written() == Decimal("1")
    writer.conn.close()


def test_a_poison_row_is_dropped_and_every_other_row_written() -> None:
    """A value the column cannot hold fails only its own row, now and for every later write."""
    writer = BalanceWriter(database_conninfo(settings.DATABASES["default"]), backoff_cap=0.2)
    loop, stop, thread = run_writer(writer)
    poison = wallet(1_000, "1e30", coin="BAD")[0]  # numeric(40, 18) holds 22 integer digits
    for row in (wallet(1_000, "1", coin="BTC")[0], poison, wallet(1_000, "2", coin="ETH")[0]):
        loop.call_soon_threadsafe(writer.offer, row)
    wait_for(lambda: written("BTC") == Decimal("1") and written("ETH") == Decimal("2"), message="the good rows")
    loop.call_soon_threadsafe(writer.offer, wallet(2_000, "3", coin="BTC")[0])
    wait_for(lambda: written("BTC") == Decimal("3"), message="a later write")
    assert writer.rejected == 1 and not writer.pending
    assert not AccountBalance.objects.filter(coin="BAD").exists()
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


def test_balances_still_pending_when_shutdown_gives_up_are_logged() -> None:
    """A write stuck behind a lock when the gateway stops: the `balances.unwritten_at_shutdown` line says how many."""
    import psycopg
    import structlog

    writer = BalanceWriter(database_conninfo(settings.DATABASES["default"]))
    writer.write(wallet(1_000, "1"))  # the row exists, so the next upsert waits for the lock below
    locker = psycopg.connect(database_conninfo(settings.DATABASES["default"]))
    locker.execute("SELECT 1 FROM streaming_accountbalance FOR UPDATE")

    async def gateway() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        writer.offer(wallet(2_000, "2")[0])
        writer.offer(wallet(2_000, "5", coin="ETH")[0])
        while writer.pending:  # until the write of both has begun (and waits for the lock)
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait({task}, timeout=0.5)  # as Gateway.shutdown gives the writers a deadline

    with structlog.testing.capture_logs() as logs:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(gateway())
        for task in asyncio.all_tasks(loop):  # what asyncio.run does with tasks still running at the end
            task.cancel()
        loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
        locker.rollback()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    (line,) = [e for e in logs if e["event"] == "balances.unwritten_at_shutdown"]
    assert (line["pending"], line["in_progress"]) == (0, 2)  # the two were being written: outcome unknown
    locker.close()
    writer.conn.close()
