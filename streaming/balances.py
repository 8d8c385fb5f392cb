"""Balances from Bybit's wallet topic into PostgreSQL, without ever blocking the sockets.

`offer()` (event loop, O(1)) keeps only the newest pending value per (account type, coin).
`run()` writes them on a connection of its own, off the loop, as one upsert that never lets
an older event overwrite a newer one. When the database is away, values wait (still newest
wins) and the writer retries with backoff; `pending` is reported in the gateway's status. A row
the table cannot hold is dropped alone (`rejected`), never blocking the rows after it.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wsgateway.logging import LogThrottle

log = structlog.get_logger(__name__)

# A row the table cannot hold (numeric overflow, a NULL where none may be): its own fault, not the database's.
ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError)

# Bybit field -> AccountBalance column.
COIN_FIELDS = {
    "walletBalance": "wallet_balance", "equity": "equity", "availableToWithdraw": "available_to_withdraw",
    "usdValue": "usd_value", "borrowAmount": "borrow_amount", "accruedInterest": "accrued_interest",
    "totalOrderIM": "total_order_im", "totalPositionIM": "total_position_im", "totalPositionMM": "total_position_mm",
    "unrealisedPnl": "unrealised_pnl", "cumRealisedPnl": "cum_realised_pnl", "locked": "locked", "bonus": "bonus",
}  # fmt: skip
ACCOUNT_FIELDS = {
    "totalEquity": "total_equity", "totalWalletBalance": "total_wallet_balance",
    "totalMarginBalance": "total_margin_balance", "totalAvailableBalance": "total_available_balance",
    "totalPerpUPL": "total_perp_upl", "totalInitialMargin": "total_initial_margin",
    "totalMaintenanceMargin": "total_maintenance_margin", "accountIMRate": "account_im_rate",
    "accountMMRate": "account_mm_rate", "accountLTV": "account_ltv",
}  # fmt: skip
FLAG_FIELDS = {"collateralSwitch": "collateral_switch", "marginCollateral": "margin_collateral"}
COLUMNS = [*COIN_FIELDS.values(), *ACCOUNT_FIELDS.values(), *FLAG_FIELDS.values()]
UPSERT = f"""
INSERT INTO streaming_accountbalance (account_type, coin, exchange_ts, updated_at, {", ".join(COLUMNS)})
VALUES (%(account_type)s, %(coin)s, %(exchange_ts)s, now(), {", ".join(f"%({c})s" for c in COLUMNS)})
ON CONFLICT (account_type, coin) DO UPDATE SET
    exchange_ts = EXCLUDED.exchange_ts, updated_at = now(), {", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS)}
WHERE streaming_accountbalance.exchange_ts <= EXCLUDED.exchange_ts
"""


def amount(value: Any) -> Decimal | None:
    """Bybit's decimal string as a Decimal; empty or absent is NULL."""
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def rows_from_wallet(item: dict[str, Any], exchange_ts_ms: int) -> list[dict[str, Any]]:
    """One wallet item (an account) -> one row per coin, account-level figures repeated."""
    exchange_ts = datetime.fromtimestamp(exchange_ts_ms / 1000, tz=UTC)
    account = {column: amount(item.get(field)) for field, column in ACCOUNT_FIELDS.items()}
    rows = []
    for coin in item.get("coin") or []:
        row = {"account_type": item["accountType"], "coin": coin["coin"], "exchange_ts": exchange_ts, **account}
        row.update({column: amount(coin.get(field)) for field, column in COIN_FIELDS.items()})
        row.update({column: coin.get(field) if isinstance(coin.get(field), bool) else None
                    for field, column in FLAG_FIELDS.items()})  # fmt: skip
        rows.append(row)
    return rows


class BalanceWriter:
    def __init__(self, conninfo: str, backoff_cap: float = 5.0) -> None:
        # DATABASE_CONNECT_TIMEOUT arrives in the conninfo; 3 s when it does not.
        self.conninfo = make_conninfo(**{"connect_timeout": 3, **conninfo_to_dict(conninfo)})
        self.backoff_cap = backoff_cap
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}
        self.writing: dict[tuple[str, str], dict[str, Any]] = {}  # the batch a worker thread is writing
        self.wakeup = asyncio.Event()
        self.conn: psycopg.Connection | None = None
        self.written = 0
        self.rejected = 0
        self.failures = 0
        self.last_error = ""
        self.throttle = LogThrottle()

    def offer(self, row: dict[str, Any]) -> None:
        """Queue a row for writing; a newer exchange time replaces what is pending."""
        key = (row["account_type"], row["coin"])
        current = self.pending.get(key)
        if current is None or current["exchange_ts"] <= row["exchange_ts"]:
            self.pending[key] = row
        self.wakeup.set()

    def write(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        """Upsert rows in one transaction (runs in a worker thread); return the rows the database refused, and why.

        A value no column can hold (a data or constraint error) fails the whole batch; then each
        row goes in its own transaction, so only the bad one is refused. Any other error (the
        database is away) raises, and the caller keeps every row.
        """
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.conninfo, autocommit=False)
        try:
            try:
                with self.conn.transaction(), self.conn.cursor() as cursor:
                    cursor.executemany(UPSERT, rows)
                return []
            except ROW_ERRORS:
                pass
            refused = []
            for row in rows:
                try:
                    with self.conn.transaction(), self.conn.cursor() as cursor:
                        cursor.execute(UPSERT, row)
                except ROW_ERRORS as exc:
                    refused.append((row, f"{type(exc).__name__}: {exc}"[:200]))
            return refused
        except psycopg.Error:
            self.conn.close()
            raise

    async def flush(self) -> bool:
        """Try to write everything pending; False if the database refused (rows it cannot hold are dropped)."""
        if not self.pending:
            return True
        batch, self.pending = self.pending, {}
        self.writing = batch
        try:
            refused = await asyncio.to_thread(self.write, list(batch.values()))
        except (psycopg.Error, OSError) as exc:
            self.writing = {}
            for key, row in batch.items():  # keep them; anything newer that arrived wins
                if key not in self.pending:
                    self.pending[key] = row
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return False
        # Cancelled (shutdown deadline) while the thread writes: `writing` keeps the batch for run() to report.
        self.writing = {}
        for row, error in refused:
            self.reject(row, error)
        self.written += len(batch) - len(refused)
        if self.failures:
            log.info("balances.recovered", written=len(batch), after_failures=self.failures)
            self.failures = 0
            self.last_error = ""
        return True

    def reject(self, row: dict[str, Any], error: str) -> None:
        """A row the table cannot hold is dropped (retrying cannot help); Bybit's next wallet update may fit."""
        self.rejected += 1
        suppressed = self.throttle.allow(f"rejected:{row['account_type']}:{row['coin']}")
        if suppressed is not None:
            log.error(
                "balances.row_rejected",
                account_type=row["account_type"],
                coin=row["coin"],
                exchange_ts=row["exchange_ts"].isoformat(),
                error=error,
                total=self.rejected,
                suppressed=suppressed,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Write until `stop`, then once more; if shutdown cancels that, say what may be lost."""
        try:
            await self.write_until(stop)
            if not await self.flush():
                # Bybit sends the wallet again on the next change; say what this run could not store.
                log.error(
                    "balances.unwritten_at_shutdown", pending=len(self.pending), in_progress=0, error=self.last_error
                )
        except asyncio.CancelledError:
            # The gateway's shutdown deadline came first: a write still running in its thread
            # may or may not land; what was pending never will.
            if self.pending or self.writing:
                log.error(
                    "balances.unwritten_at_shutdown",
                    pending=len(self.pending),
                    in_progress=len(self.writing),
                    error="cancelled at the shutdown deadline",
                )
            raise
        if self.conn is not None:
            self.conn.close()

    async def write_until(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            if await self.flush():
                attempt = 0
                self.wakeup.clear()
                if self.pending:
                    continue
                waiter = asyncio.ensure_future(self.wakeup.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            delay = random.uniform(0, min(self.backoff_cap, 0.1 * 2**attempt))
            attempt += 1
            log.warning(
                "balances.write_failed", error=self.last_error, pending=len(self.pending), retry_in=round(delay, 3)
            )
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
