"""Bybit V5 REST client for private state: signed GETs, cursor pages, rate-limit waits, retries (httpx, asyncio).

The five endpoints the gateway repairs gaps from: open and recently closed orders
(`/v5/order/realtime`), order history, executions, positions and wallet balances. Requests are
signed as Bybit's Integration Guidance says: `X-BAPI-SIGN` = hex HMAC-SHA256 of
timestamp + api_key + recv_window + the query string exactly as sent. Classification (retry vs fatal):

- network errors, HTTP 5xx, a body that is not JSON, retCode 10016 (server error) and 10002
  (timestamp outside the recv window; re-signed with a fresh timestamp): retried with capped,
  jittered backoff, `attempts` times in all;
- retCode 10006/10018 (rate limits): wait until `X-Bapi-Limit-Reset-Timestamp` and try again; and when
  `X-Bapi-Limit-Status` reaches 0 the next call to that endpoint waits for the reset instead of being refused;
- everything else (bad key 10003, bad signature 10004, bad parameters 10001, HTTP 403 IP ban, ...)
  raises `BybitRestError` at once, carrying retCode and retMsg. No credential ever reaches an
  exception, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import structlog

from streaming.circuit import backoff_delay

log = structlog.get_logger(__name__)

BASE_URLS = {
    "mainnet": "https://api.bybit.com",
    "testnet": "https://api-testnet.bybit.com",
    "demo": "https://api-demo.bybit.com",  # pybit's DEMO_SUBDOMAIN_MAINNET; demo trading's own REST host
}
SIMULATOR_REST_PORT_OFFSET = 1  # the simulator serves REST on its control port, SIMULATOR_PORT + 1 by default
RECV_WINDOW_MS = 5000
SEVEN_DAYS_MS = 7 * 24 * 3_600_000  # the widest startTime..endTime window /v5/execution/list accepts
TRADE_HISTORY_MS = 2 * 365 * 24 * 3_600_000  # "Get Trade History (2 years)": nothing older to ask for
LINEAR_SETTLE_COINS = ("USDT", "USDC")  # linear lists need symbol, baseCoin or settleCoin: ask each settle coin
RETRY_CODES = frozenset({10002, 10016})
RATE_LIMIT_CODES = frozenset({10006, 10018})
RATE_LIMIT_MAX_WAIT = 5.0  # seconds; Bybit's windows are one second, so a longer reset means skewed clocks
# The reset comes in whole milliseconds: waking exactly then can be a hair early, and the call is refused.
RATE_LIMIT_RESET_MARGIN = 0.01
# Query values are sent as Bybit hands them out: a cursor arrives percent-encoded and goes back as it
# came (as pybit sends it); commas separate coin lists.
QUERY_SAFE = "%,"


class BybitRestError(Exception):
    """Bybit refused a request (retCode and retMsg as Bybit sent them), or retries ran out (`transient`)."""

    def __init__(
        self, path: str, ret_code: int | None, ret_msg: str, http_status: int = 200, transient: bool = False
    ) -> None:
        self.path = path
        self.ret_code = ret_code
        self.ret_msg = ret_msg
        self.http_status = http_status
        self.transient = transient
        code = f"retCode {ret_code}" if ret_code is not None else f"HTTP {http_status}"
        super().__init__(f"Bybit {path}: {code}: {ret_msg}")


def base_url(environment: str, rest_url: str = "", simulator: tuple[str, int] = ("127.0.0.1", 8765)) -> str:
    """The REST base URL: `rest_url` when set, else the environment's (the simulator's control port for it)."""
    if rest_url:
        return rest_url.rstrip("/")
    if environment == "simulator":
        return f"http://{simulator[0]}:{simulator[1] + SIMULATOR_REST_PORT_OFFSET}"
    return BASE_URLS[environment]


def query_string(params: Mapping[str, Any]) -> str:
    """The query string to send and to sign, in the caller's order; None values are left out."""
    return "&".join(f"{k}={quote(str(v), safe=QUERY_SAFE)}" for k, v in params.items() if v is not None)


def signature(secret: bytes, timestamp: str, api_key: str, recv_window: str, payload: str) -> str:
    return hmac.new(secret, f"{timestamp}{api_key}{recv_window}{payload}".encode(), hashlib.sha256).hexdigest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class BybitRest:
    """Signed GETs on Bybit's V5 REST API over one httpx.AsyncClient; use it as `async with BybitRest(...)`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        api_secret: str,
        *,
        recv_window: int = RECV_WINDOW_MS,
        timeout: float = 10.0,
        attempts: int = 5,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        max_rate_waits: int = 50,
    ) -> None:
        """`attempts` bounds tries on transient failures; `max_rate_waits` bounds waits on rate limits."""
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._secret = api_secret.encode()
        self.recv_window = str(recv_window)
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_rate_waits = max_rate_waits
        self.resume_at: dict[str, float] = {}  # path -> epoch seconds before which its limit is used up
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers={"Accept": "application/json"})

    @classmethod
    def from_settings(cls, s: Any, **options: Any) -> BybitRest:
        """A client for `django.conf.settings` (or any object with the same names)."""
        url = base_url(s.BYBIT_ENVIRONMENT, s.BYBIT_REST_URL, (s.SIMULATOR_HOST, s.SIMULATOR_PORT))
        return cls(url, s.BYBIT_API_KEY, s.BYBIT_API_SECRET, **options)

    def __repr__(self) -> str:
        return f"BybitRest({self.url!r})"

    async def __aenter__(self) -> BybitRest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # One request.

    async def get(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Bybit's `result` for one signed GET, after retries and rate-limit waits; raises BybitRestError."""
        query = query_string(params)
        target = f"{path}?{query}" if query else path
        failures = rate_waits = 0
        while True:
            await self.wait_for_limit(path)
            timestamp = str(now_ms())
            headers = {
                "X-BAPI-API-KEY": self.api_key,
                "X-BAPI-TIMESTAMP": timestamp,
                "X-BAPI-RECV-WINDOW": self.recv_window,
                "X-BAPI-SIGN": signature(self._secret, timestamp, self.api_key, self.recv_window, query),
            }
            try:
                response = await self.http.get(target, headers=headers)
            except httpx.TransportError as exc:
                reason, code, status = type(exc).__name__, None, 0
            else:
                self.note_limit(path, response.headers)
                status = response.status_code
                body = self.decode(response)
                if body is not None and status == 200:
                    code, message = body.get("retCode"), self.scrub(str(body.get("retMsg", "")))
                    if code == 0:
                        return body.get("result") or {}
                    if code in RATE_LIMIT_CODES and rate_waits < self.max_rate_waits:
                        rate_waits += 1
                        await self.wait_out_refusal(path, response.headers, code)
                        continue
                    if code not in RETRY_CODES:
                        raise BybitRestError(path, code, message)
                    reason = f"retCode {code}: {message}"
                elif status >= 500 or (status == 200 and body is None):
                    code, reason = None, f"HTTP {status}" + (" (not JSON)" if status == 200 else "")
                else:
                    code = body.get("retCode") if body else None
                    message = self.scrub(str(body.get("retMsg", ""))) if body else self.http_refusal(status)
                    raise BybitRestError(path, code, message, http_status=status)
            failures += 1
            if failures >= self.attempts:
                raise BybitRestError(path, code, f"gave up after {failures} attempts: {reason}", status, True)
            delay = backoff_delay(failures, self.backoff_base, self.backoff_cap)
            log.warning("bybitrest.retry", path=path, attempt=failures, reason=reason, delay=round(delay, 3))
            await asyncio.sleep(delay)

    def decode(self, response: httpx.Response) -> dict[str, Any] | None:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None

    def scrub(self, message: str) -> str:
        """Bybit may echo the signed string (with the key) in a retMsg; the key stays out of our errors."""
        return message.replace(self.api_key, "<api-key>") if self.api_key else message

    def http_refusal(self, status: int) -> str:
        if status == 403:
            return "access denied: over the IP rate limit (Bybit asks for a 10-minute pause) or a blocked region"
        return f"unexpected HTTP status {status}"

    # Rate limits.

    def note_limit(self, path: str, headers: httpx.Headers) -> None:
        """Remember when `path`'s limit resets once Bybit says none is left in this window."""
        if headers.get("X-Bapi-Limit-Status") == "0":
            self.resume_at[path] = self.reset_time(headers)

    def reset_time(self, headers: httpx.Headers) -> float:
        try:
            reset = int(headers.get("X-Bapi-Limit-Reset-Timestamp", "")) / 1000 + RATE_LIMIT_RESET_MARGIN
        except ValueError:
            reset = time.time() + 1.0  # no header (an IP limit, 10018): one window
        return min(reset, time.time() + RATE_LIMIT_MAX_WAIT)

    async def wait_for_limit(self, path: str) -> None:
        delay = self.resume_at.get(path, 0.0) - time.time()
        if delay > 0:
            # Debug only: at full speed every call waits a little, and a line per request would be noise.
            log.debug("bybitrest.rate_limit_wait", path=path, wait=round(delay, 3))
            await asyncio.sleep(delay)

    async def wait_out_refusal(self, path: str, headers: httpx.Headers, code: int) -> None:
        """Bybit refused for the rate limit: the next try waits for the reset (at least a few ms, jittered)."""
        self.resume_at[path] = max(self.reset_time(headers), time.time() + backoff_delay(0, 0.05, 0.05))
        log.info("bybitrest.rate_limited", path=path, ret_code=code)

    # Pages.

    async def pages(self, path: str, params: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Each page's `result`, following `nextPageCursor` until Bybit returns an empty one."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            result = await self.get(path, {**params, "cursor": cursor})
            yield result
            cursor = result.get("nextPageCursor") or None
            if cursor is None or not result.get("list"):
                return
            if cursor in seen:
                raise BybitRestError(path, None, "Bybit returned a cursor it had returned before")
            seen.add(cursor)

    async def collect(self, path: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every item of every page, in Bybit's order."""
        return [item async for result in self.pages(path, params) for item in result.get("list", [])]

    async def collect_linear(self, path: str, category: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """As collect; a linear list with no symbol, baseCoin or settleCoin asks each settle coin in turn."""
        scoped = any(params.get(name) for name in ("symbol", "baseCoin", "settleCoin", "orderId", "orderLinkId"))
        if category != "linear" or scoped:
            return await self.collect(path, {"category": category, **params})
        items = []
        for coin in LINEAR_SETTLE_COINS:
            items += await self.collect(path, {"category": category, **params, "settleCoin": coin})
        return items

    # The five endpoints.

    async def open_orders(self, category: str, **params: Any) -> list[dict[str, Any]]:
        """Every open order (New, PartiallyFilled, Untriggered) of a category, newest first."""
        return await self.collect_linear("/v5/order/realtime", category, {**params, "openOnly": 0, "limit": 50})

    async def recent_closed_orders(self, category: str, **params: Any) -> list[dict[str, Any]]:
        """The latest closed orders Bybit keeps on its realtime endpoint (500 per category), newest first."""
        return await self.collect_linear("/v5/order/realtime", category, {**params, "openOnly": 1, "limit": 50})

    async def order_history(
        self, category: str, start_ms: int | None = None, end_ms: int | None = None, **params: Any
    ) -> list[dict[str, Any]]:
        """Orders of [start_ms, end_ms] (end defaults to now), in 7-day windows as Bybit requires; without
        start_ms, Bybit's default of the last 7 days."""
        base = {"category": category, **params, "limit": 50}
        return await self.in_windows("/v5/order/history", base, start_ms, end_ms)

    async def executions(
        self, category: str, start_ms: int | None = None, end_ms: int | None = None, **params: Any
    ) -> list[dict[str, Any]]:
        """Every execution with execTime in [start_ms, end_ms] (end defaults to now), in 7-day windows as Bybit
        requires; without start_ms, Bybit's default of the last 7 days."""
        base = {"category": category, **params, "limit": 100}
        return await self.in_windows("/v5/execution/list", base, start_ms, end_ms)

    async def in_windows(
        self, path: str, base: dict[str, Any], start_ms: int | None, end_ms: int | None
    ) -> list[dict[str, Any]]:
        """Every page of a history endpoint over [start_ms, end_ms], asked in windows of at most 7 days
        (Bybit refuses a wider one with 10001) and no further back than the 2 years it keeps."""
        if start_ms is None:
            return await self.collect(path, {**base, "endTime": end_ms})
        end = now_ms() if end_ms is None else end_ms
        start_ms = max(start_ms, end - TRADE_HISTORY_MS)
        items: list[dict[str, Any]] = []
        while start_ms <= end:
            window_end = min(end, start_ms + SEVEN_DAYS_MS)
            items += await self.collect(path, {**base, "startTime": start_ms, "endTime": window_end})
            start_ms = window_end + 1
        return items

    async def positions(self, category: str, **params: Any) -> list[dict[str, Any]]:
        """Open positions of a category (or every position of `symbol`, open or not)."""
        return await self.collect_linear("/v5/position/list", category, {**params, "limit": 200})

    async def wallet_balance(self, account_type: str = "UNIFIED", coin: str | None = None) -> list[dict[str, Any]]:
        """The account's wallet: a list of one account with its coins (Bybit's `result.list`)."""
        result = await self.get("/v5/account/wallet-balance", {"accountType": account_type, "coin": coin})
        return list(result.get("list", []))
