"""Bybit's V5 REST API for private state, served by the simulator from the store its private pushes come from.

Five signed GET endpoints (`/v5/order/realtime`, `/v5/order/history`, `/v5/execution/list`,
`/v5/position/list`, `/v5/account/wallet-balance`) on the control port. As Bybit's pages give it:
the signature (hex HMAC-SHA256 of timestamp + key + recv_window + query string, as sent), the recv
window (`now - recv_window <= timestamp < now + 1000`), the body `{retCode, retMsg, result, retExtInfo,
time}`, cursor pages, and a rolling one-second rate limit per key and endpoint answered with
`X-Bapi-Limit`, `X-Bapi-Limit-Status` and `X-Bapi-Limit-Reset-Timestamp`. Strings we could not
confirm word for word are the named constants below.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from streaming.simulator.market import now_ms
from streaming.simulator.private import OPEN_ORDER_STATUSES, PrivateState, coins, decimal

if TYPE_CHECKING:
    from streaming.simulator.server import Simulator

# Rate Limit Rules page: 50 requests/s per UID on each of the five endpoints, a rolling one-second window.
ENDPOINT_LIMITS = {
    "/v5/order/realtime": 50,
    "/v5/order/history": 50,
    "/v5/execution/list": 50,
    "/v5/position/list": 50,
    "/v5/account/wallet-balance": 50,
}
RATE_WINDOW = 1.0
IP_LIMIT, IP_WINDOW = 600, 5.0  # per IP across every endpoint; past it Bybit answers HTTP 403
RECV_WINDOW_DEFAULT = 5000
FUTURE_TOLERANCE_MS = 1000
SEVEN_DAYS_MS = 7 * 24 * 3_600_000
RECENT_CLOSED_KEPT = 500  # closed orders `/v5/order/realtime?openOnly=1` keeps per category
# Time field `/v5/order/history` filters startTime/endTime on (check: the docs do not say).
HISTORY_TIME_FIELD = "createdTime"
# (default, maximum) `limit` per page, from each endpoint's page.
PAGE_LIMITS = {
    "/v5/order/realtime": (20, 50),
    "/v5/order/history": (20, 50),
    "/v5/execution/list": (50, 100),
    "/v5/position/list": (20, 200),
}
CATEGORIES = {
    "/v5/order/realtime": ("spot", "linear", "inverse", "option"),
    "/v5/order/history": ("spot", "linear", "inverse", "option"),
    "/v5/execution/list": ("spot", "linear", "inverse", "option"),
    "/v5/position/list": ("linear", "inverse", "option"),
}
ACCOUNT_TYPES = ("UNIFIED", "CONTRACT", "SPOT")

# retMsg wording from Bybit's Error Code page, except where marked.
RET_OK = "OK"
RET_PARAMS = "Request parameter error: {detail}"  # (check) live messages vary per parameter
RET_TIMESTAMP = "The request time exceeds the time window range."
RET_BAD_KEY = "API key is invalid."
RET_BAD_SIGN = "Error sign, please check your signature generation algorithm."
RET_RATE_LIMIT = "Too many visits!"  # Rate Limit Rules page
RET_SERVER_ERROR = "Internal System Error."
RET_ROUTE = "Route not found."
HTTP_IP_BANNED = "403, access too frequent"  # Rate Limit Rules page; sent as a plain-text HTTP 403 (check body)
HTTP_UNAVAILABLE = "<html><body>502 Bad Gateway</body></html>"  # what a proxy in front of Bybit sends (check)

CURSOR = "page_args%3D{0}_{1}%26"  # Bybit-shaped: already percent-encoded, as Bybit's own cursors are
CURSOR_PATTERN = re.compile(r"^page_args(?:=|%3D)(\d+)_(\d+)(?:&|%26)?$")


class ParamError(ValueError):
    """A request parameter Bybit would refuse with retCode 10001."""


def sign(secret: str, origin: str) -> str:
    return hmac.new(secret.encode(), origin.encode(), hashlib.sha256).hexdigest()


def auth_refusal(
    headers: Mapping[str, str], query: str, credentials: Mapping[str, str], now: int
) -> tuple[int, str] | None:
    """Bybit's (retCode, retMsg) refusing a signed GET with this raw query string, or None when it is good."""
    key = headers.get("X-BAPI-API-KEY", "")
    secret = credentials.get(key) if key else None
    if secret is None:
        return 10003, RET_BAD_KEY
    stamp, window = headers.get("X-BAPI-TIMESTAMP", ""), headers.get("X-BAPI-RECV-WINDOW")
    try:
        timestamp, recv_window = int(stamp), int(window) if window is not None else RECV_WINDOW_DEFAULT
    except ValueError:
        return 10001, RET_PARAMS.format(detail="X-BAPI-TIMESTAMP and X-BAPI-RECV-WINDOW must be integers")
    if not now - recv_window <= timestamp < now + FUTURE_TOLERANCE_MS:
        return 10002, RET_TIMESTAMP
    expected = sign(secret, f"{stamp}{key}{window or ''}{query}")
    if not hmac.compare_digest(expected, headers.get("X-BAPI-SIGN", "")):
        return 10004, RET_BAD_SIGN
    return None


class RateLimiter:
    """Bybit's per-key, per-endpoint limit over a rolling window, and the three headers that report it."""

    def __init__(self, limits: dict[str, int], window: float = RATE_WINDOW) -> None:
        self.limits = limits
        self.window = window
        self.calls: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)

    def take(self, key: str, path: str, now: float) -> tuple[bool, dict[str, str]]:
        """Count one call at `now` (epoch seconds) unless over the limit; (allowed, X-Bapi-Limit headers)."""
        limit = self.limits.get(path, ENDPOINT_LIMITS.get(path, 50))
        calls = self.calls[(key, path)]
        while calls and calls[0] <= now - self.window:
            calls.popleft()
        allowed = len(calls) < limit
        if allowed:
            calls.append(now)
        remaining = max(0, limit - len(calls))
        # The reset is "now" until the limit is used up; then when the oldest call leaves the window.
        reset = calls[0] + self.window if remaining == 0 and calls else now
        headers = {
            "X-Bapi-Limit": str(limit),
            "X-Bapi-Limit-Status": str(remaining),
            "X-Bapi-Limit-Reset-Timestamp": str(math.ceil(reset * 1000)),  # never before the limit has reset
        }
        return allowed, headers


def int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name, "")
    if raw == "":
        return default
    if not raw.lstrip("-").isdigit() or not low <= int(raw) <= high:
        raise ParamError(f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


def category_param(params: Mapping[str, str], path: str) -> str:
    category = params.get("category", "")
    if category not in CATEGORIES[path]:
        raise ParamError(f"category must be one of {', '.join(CATEGORIES[path])}")
    return category


def time_window(params: Mapping[str, str], now: int) -> tuple[int, int]:
    """[start, end] in ms by Bybit's rule: 7 days back by default, 7 days from a lone bound, at most 7 days."""
    start = int_param(params, "startTime", -1, 0, 2**53)
    end = int_param(params, "endTime", -1, 0, 2**53)
    if start < 0 and end < 0:
        return now - SEVEN_DAYS_MS, now
    if end < 0:
        return start, start + SEVEN_DAYS_MS
    if start < 0:
        return end - SEVEN_DAYS_MS, end
    if start > end or end - start > SEVEN_DAYS_MS:
        raise ParamError("endTime - startTime must be between 0 and 7 days")
    return start, end


def page(
    rows: list[tuple[tuple[int, int], dict[str, Any]]], params: Mapping[str, str], path: str
) -> tuple[list[dict[str, Any]], str]:
    """One page of `rows` (newest first by key) after the request's cursor, and the cursor of the next ("" at the end).

    The cursor names the last key returned, so rows added while a client pages never repeat or shift a page.
    """
    default, maximum = PAGE_LIMITS[path]
    limit = int_param(params, "limit", default, 1, maximum)
    rows = sorted(rows, key=lambda row: row[0], reverse=True)
    if params.get("cursor"):
        match = CURSOR_PATTERN.match(params["cursor"])
        if match is None:
            raise ParamError("cursor is invalid")
        after = (int(match[1]), int(match[2]))
        rows = [row for row in rows if row[0] < after]
    chunk = rows[:limit]
    cursor = CURSOR.format(*chunk[-1][0]) if len(rows) > limit else ""
    return [rest_item(item) for _, item in chunk], cursor


def rest_item(item: dict[str, Any]) -> dict[str, Any]:
    """REST lists carry `category` once, beside the list, not in each item as the WebSocket does."""
    return {k: v for k, v in item.items() if k != "category"}


def matches(item: dict[str, Any], params: Mapping[str, str], category: str) -> bool:
    """Bybit's filter priority: orderId > orderLinkId > symbol > baseCoin (settleCoin narrows further)."""
    for name in ("orderId", "orderLinkId"):
        if params.get(name):
            return item.get(name) == params[name]
    base, settle = coins(category, item["symbol"])
    if params.get("settleCoin") and settle != params["settleCoin"]:
        return False
    if params.get("symbol"):
        return item["symbol"] == params["symbol"]
    return not params.get("baseCoin") or base == params["baseCoin"]


def require_linear_scope(params: Mapping[str, str], category: str) -> None:
    if category == "linear" and not any(params.get(n) for n in ("symbol", "baseCoin", "settleCoin", "orderId")):
        raise ParamError("symbol, baseCoin or settleCoin is required for linear")


def order_key(state: PrivateState, item: dict[str, Any]) -> tuple[int, int]:
    return int(item["createdTime"]), state.first_seen[("order", item["orderId"])]


def open_orders(state: PrivateState, params: Mapping[str, str], now: int) -> dict[str, Any]:
    path = "/v5/order/realtime"
    category = category_param(params, path)
    require_linear_scope(params, category)
    open_only = int_param(params, "openOnly", 0, 0, 2)
    orders = [o for o in state.orders.values() if o["category"] == category and matches(o, params, category)]
    if not (params.get("orderId") or params.get("orderLinkId")):  # openOnly is ignored for an order asked by id
        if open_only == 0:
            orders = [o for o in orders if o["orderStatus"] in OPEN_ORDER_STATUSES]
        else:
            closed = [o for o in orders if o["orderStatus"] not in OPEN_ORDER_STATUSES]
            orders = sorted(closed, key=lambda o: int(o["updatedTime"]))[-RECENT_CLOSED_KEPT:]
    listed, cursor = page([(order_key(state, o), o) for o in orders], params, path)
    return {"category": category, "list": listed, "nextPageCursor": cursor}


def order_history(state: PrivateState, params: Mapping[str, str], now: int) -> dict[str, Any]:
    path = "/v5/order/history"
    category = category_param(params, path)
    start, end = time_window(params, now)
    status = params.get("orderStatus")
    orders = [
        o
        for o in state.orders.values()
        if o["category"] == category
        and matches(o, params, category)
        and start <= int(o[HISTORY_TIME_FIELD]) <= end
        and (not status or o["orderStatus"] == status)
    ]
    listed, cursor = page([(order_key(state, o), o) for o in orders], params, path)
    return {"category": category, "list": listed, "nextPageCursor": cursor}


def executions(state: PrivateState, params: Mapping[str, str], now: int) -> dict[str, Any]:
    path = "/v5/execution/list"
    category = category_param(params, path)
    start, end = time_window(params, now)
    kind = params.get("execType")
    rows = [
        ((int(e["execTime"]), state.first_seen[("execution", e["execId"])]), e)
        for e in state.executions.values()
        if e["category"] == category
        and matches(e, params, category)
        and start <= int(e["execTime"]) <= end
        and (not kind or e["execType"] == kind)
    ]
    listed, cursor = page(rows, params, path)
    return {"category": category, "list": listed, "nextPageCursor": cursor}


def positions(state: PrivateState, params: Mapping[str, str], now: int) -> dict[str, Any]:
    path = "/v5/position/list"
    category = category_param(params, path)
    require_linear_scope(params, category)
    rows = []
    for key, p in state.positions.items():
        if p["category"] != category or not matches(p, params, category):
            continue
        # A symbol asked by name is returned whatever its size; otherwise only open positions.
        if not params.get("symbol") and decimal(p.get("size")) <= 0:
            continue
        rows.append(((int(p["createdTime"]), state.first_seen[("position", key)]), p))
    listed, cursor = page(rows, params, path)
    return {"category": category, "list": listed, "nextPageCursor": cursor}


def wallet_balance(state: PrivateState, params: Mapping[str, str], now: int) -> dict[str, Any]:
    account = params.get("accountType", "")
    if account not in ACCOUNT_TYPES:
        raise ParamError(f"accountType must be one of {', '.join(ACCOUNT_TYPES)}")
    wallet = state.wallets.get(account)
    if wallet is None:
        return {"list": []}
    wanted = {c for c in params.get("coin", "").split(",") if c}
    if wanted:
        wallet = {**wallet, "coin": [c for c in wallet["coin"] if c["coin"] in wanted]}
    return {"list": [wallet]}


ENDPOINTS: dict[str, Callable[[PrivateState, Mapping[str, str], int], dict[str, Any]]] = {
    "/v5/order/realtime": open_orders,
    "/v5/order/history": order_history,
    "/v5/execution/list": executions,
    "/v5/position/list": positions,
    "/v5/account/wallet-balance": wallet_balance,
}


@dataclass
class RestFault:
    """The next `count` REST requests fail: `error` (retCode 10016), `http_5xx` (HTTP 502) or `stall` (answer late)."""

    mode: str
    count: int
    seconds: float = 0.0


Response = tuple[HTTPStatus, dict[str, str], bytes]


class Rest:
    """The simulator's REST surface: checks a request as Bybit does, then answers it from the private-state store."""

    FAULT_MODES = ("error", "http_5xx", "stall")

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.limiter = RateLimiter(dict(ENDPOINT_LIMITS))
        self.ip_calls: deque[float] = deque()
        self.ip_limit = IP_LIMIT
        self.fault: RestFault | None = None
        self.answered: Counter[tuple[str, int]] = Counter()  # (path, retCode, or HTTP status when not 200)

    def set_limits(self, limits: dict[str, int] | None = None, window: float | None = None) -> dict[str, Any]:
        """Change per-endpoint limits (requests per window) and the window, for tests; returns the settings."""
        self.limiter.limits.update(limits or {})
        if window is not None:
            self.limiter.window = window
        self.limiter.calls.clear()
        return {"limits": self.limiter.limits, "window": self.limiter.window}

    def fail(self, mode: str, count: int = 1, seconds: float = 0.0) -> None:
        if mode not in self.FAULT_MODES:
            raise ValueError(f"unknown REST fault {mode!r}; use {', '.join(self.FAULT_MODES)}")
        self.fault = RestFault(mode, count, seconds) if count > 0 else None

    def body(self, ret_code: int, ret_msg: str, result: Any = None) -> bytes:
        return orjson.dumps(
            {"retCode": ret_code, "retMsg": ret_msg, "result": result or {}, "retExtInfo": {}, "time": now_ms()}
        )

    async def handle(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Response:
        status, extra, body = await self.answer(method, path, query, headers)
        code = orjson.loads(body)["retCode"] if status == HTTPStatus.OK else status.value
        self.answered[(path, code)] += 1
        return status, extra, body

    async def answer(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Response:
        json = {"Content-Type": "application/json; charset=utf-8"}
        if method != "GET" or path not in ENDPOINTS:
            return HTTPStatus.NOT_FOUND, json, self.body(10017, RET_ROUTE)
        if self.fault is not None:
            fault = self.fault
            fault.count -= 1
            if fault.count <= 0:
                self.fault = None
            if fault.mode == "stall":
                await asyncio.sleep(fault.seconds)
            elif fault.mode == "error":
                return HTTPStatus.OK, json, self.body(10016, RET_SERVER_ERROR)
            else:
                return HTTPStatus.BAD_GATEWAY, {"Content-Type": "text/html"}, HTTP_UNAVAILABLE.encode()
        now = time.time()
        while self.ip_calls and self.ip_calls[0] <= now - IP_WINDOW:
            self.ip_calls.popleft()
        if len(self.ip_calls) >= self.ip_limit:
            return HTTPStatus.FORBIDDEN, {"Content-Type": "text/plain"}, HTTP_IP_BANNED.encode()
        self.ip_calls.append(now)
        # Rejecting every auth (the WebSocket fault) is knowing no key here too.
        credentials = {} if self.simulator.faults.auth_rejected else self.simulator.credentials
        refusal = auth_refusal(headers, query, credentials, int(now * 1000))
        if refusal is not None:
            return HTTPStatus.OK, json, self.body(*refusal)
        allowed, limit_headers = self.limiter.take(headers["X-BAPI-API-KEY"], path, now)
        if not allowed:
            return HTTPStatus.OK, {**json, **limit_headers}, self.body(10006, RET_RATE_LIMIT)
        try:
            params = dict(parse_qsl(query, keep_blank_values=True))
            result = ENDPOINTS[path](self.simulator.private, params, int(now * 1000))
        except ParamError as exc:
            return HTTPStatus.OK, {**json, **limit_headers}, self.body(10001, RET_PARAMS.format(detail=exc))
        return HTTPStatus.OK, {**json, **limit_headers}, self.body(0, RET_OK, result)
