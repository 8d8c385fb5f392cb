"""Private account events of the Bybit simulator: items in Bybit's shapes, and the store that keeps every one emitted.

Field lists follow Bybit's V5 pages for the private `order`, `execution`, `position` and `wallet`
topics and the REST pages that return the same objects. An order, a position or a wallet is
built over its previous state (fields not given carry over), so updates look like Bybit's: an
order keeps its `createdTime` and its `updatedTime` grows, a position's `seq` grows.
"""

from __future__ import annotations

import itertools
from decimal import Decimal, InvalidOperation
from typing import Any, TypedDict

from streaming.simulator.market import now_ms

# Bybit's enum page: open statuses; every other status is closed (check: Created/Active are not listed for V5).
OPEN_ORDER_STATUSES = frozenset({"New", "PartiallyFilled", "Untriggered"})
CONTRACT_CATEGORIES = frozenset({"linear", "inverse"})
TAKER_FEE_RATE = "0.00055"
MAKER_FEE_RATE = "0.0002"
FIRST_SEQ = 8_000_000_000  # Bybit's cross sequences are large numbers; any start that grows will do


def coins(category: str, symbol: str) -> tuple[str, str]:
    """(base coin, settle coin) of a symbol; for spot the settle coin is the quote coin."""
    if category == "option":  # BTC-26DEC26-100000-C, settled in USDC
        return symbol.split("-")[0], "USDC"
    if category == "inverse":  # BTCUSD, margined and settled in BTC
        base = symbol.removesuffix("USD")
        return base, base
    for quote, settle in (("USDT", "USDT"), ("USDC", "USDC"), ("PERP", "USDC")):
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], settle
    return symbol, "USDT"


def decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value)) if value not in ("", None) else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def plain(value: Decimal) -> str:
    """A decimal string as Bybit writes amounts: no exponent, no trailing zeros."""
    text = format(value.normalize(), "f")
    return text if text != "-0" else "0"


def later(previous: dict[str, Any] | None, field: str) -> str:
    """Now in ms, but always after the previous state's `field`, so successive updates never share a time."""
    last = int(previous[field]) if previous and str(previous.get(field, "")).isdigit() else 0
    return str(max(now_ms(), last + 1))


def order_item(n: int, seq: int, fields: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    category = fields.get("category") or (previous or {}).get("category", "linear")
    item = dict(previous) if previous else {
        "category": category, "symbol": "BTCUSDT", "orderId": f"sim-order-{n}", "orderLinkId": "",
        "blockTradeId": "", "isLeverage": "", "side": "Buy", "positionIdx": 0, "orderType": "Limit",
        "price": "30000.00", "qty": "0.010", "orderStatus": "New", "cancelType": "UNKNOWN",
        "rejectReason": "EC_NoError", "timeInForce": "GTC", "avgPrice": "", "leavesQty": "0.010",
        "leavesValue": "300", "cumExecQty": "0", "cumExecValue": "0", "cumExecFee": "0", "closedPnl": "0",
        "feeCurrency": "", "stopOrderType": "", "orderIv": "", "marketUnit": "", "triggerPrice": "",
        "takeProfit": "", "stopLoss": "", "tpLimitPrice": "", "slLimitPrice": "", "tpTriggerBy": "",
        "slTriggerBy": "", "triggerDirection": 0, "triggerBy": "", "lastPriceOnCreated": "", "reduceOnly": False,
        "closeOnTrigger": False, "placeType": "", "smpType": "None", "smpGroup": 0, "smpOrderId": "",
        "parentOrderLinkId": "", "createdTime": "", "updatedTime": "",
    }  # fmt: skip
    item.update(fields)
    item["updatedTime"] = str(fields["updatedTime"]) if "updatedTime" in fields else later(previous, "updatedTime")
    if not item["createdTime"]:
        item["createdTime"] = item["updatedTime"]
    qty, price = decimal(item["qty"]), decimal(item["price"])
    if "cumExecQty" not in fields and item["orderStatus"] in ("Filled", "PartiallyFilled"):
        filled = qty if item["orderStatus"] == "Filled" else (qty / 2).quantize(Decimal("0.001"))
        item.update(cumExecQty=item["qty"] if filled == qty else plain(filled), cumExecValue=plain(filled * price),
                    avgPrice=item["price"], cumExecFee=plain(filled * price * Decimal(TAKER_FEE_RATE)))  # fmt: skip
    done = decimal(item["cumExecQty"])
    open_ = item["orderStatus"] in OPEN_ORDER_STATUSES
    if "leavesQty" not in fields:
        item["leavesQty"] = plain(qty - done) if open_ else "0"
    if "leavesValue" not in fields:
        item["leavesValue"] = plain((qty - done) * price) if open_ else "0"
    if "cumFeeDetail" not in fields:
        fee = decimal(item["cumExecFee"])
        item["cumFeeDetail"] = {coins(category, item["symbol"])[1]: plain(fee)} if fee else {}
    # Spot has no tpslMode (clients tell a spot order from a contract one by it) and no createType.
    if category == "spot":
        item.pop("tpslMode", None)
        item.pop("createType", None)
    else:
        item.setdefault("tpslMode", "Full" if category in CONTRACT_CATEGORIES else "")
        if category in CONTRACT_CATEGORIES:
            item.setdefault("createType", "CreateByUser")
    return item


def execution_item(n: int, seq: int, fields: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    category = fields.get("category", "linear")
    item = {
        "category": category, "symbol": "BTCUSDT", "execId": f"sim-exec-{n}", "orderId": f"sim-order-{n}",
        "orderLinkId": "", "isLeverage": "0", "side": "Buy", "orderPrice": "30000.00", "orderQty": "0.010",
        "leavesQty": "0", "orderType": "Limit", "stopOrderType": "", "execPrice": "30000.00", "execQty": "0.010",
        "execType": "Trade", "execTime": str(now_ms()), "isMaker": False, "feeCurrency": "", "tradeIv": "",
        "markIv": "", "markPrice": "30010.00", "indexPrice": "", "underlyingPrice": "", "blockTradeId": "",
        "closedSize": "0", "execPnl": "0", "extraFees": "", "seq": seq,
    }  # fmt: skip
    item.update(fields)
    value = decimal(item["execPrice"]) * decimal(item["execQty"])
    item.setdefault("feeRate", MAKER_FEE_RATE if item["isMaker"] else TAKER_FEE_RATE)
    item.setdefault("execValue", plain(value))
    item.setdefault("execFee", plain(value * decimal(item["feeRate"])))
    if category in CONTRACT_CATEGORIES:
        item.setdefault("createType", "CreateByUser")
    return item


def position_item(n: int, seq: int, fields: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    category = fields.get("category") or (previous or {}).get("category", "linear")
    item = dict(previous) if previous else {
        "category": category, "symbol": "BTCUSDT", "side": "Buy", "size": "0.010", "positionIdx": 0,
        "tradeMode": 0, "riskId": 1, "riskLimitValue": "2000000", "avgPrice": "30000.00", "markPrice": "30010.00",
        "positionValue": "300.00", "leverage": "10", "positionBalance": "30.00", "autoAddMargin": 0,
        "positionIM": "30.00", "positionMM": "1.50", "liqPrice": "27000.00", "bustPrice": "", "takeProfit": "0",
        "stopLoss": "0", "trailingStop": "0", "unrealisedPnl": "0.10", "curRealisedPnl": "-0.165",
        "cumRealisedPnl": "0", "sessionAvgPrice": "", "positionStatus": "Normal", "adlRankIndicator": 2,
        "isReduceOnly": False, "mmrSysUpdatedTime": "", "leverageSysUpdatedTime": "", "createdTime": "",
        "updatedTime": "",
    }  # fmt: skip
    item.update(fields)
    item["seq"] = fields.get("seq", seq)
    item["updatedTime"] = str(fields["updatedTime"]) if "updatedTime" in fields else later(previous, "updatedTime")
    if not item["createdTime"]:
        item["createdTime"] = item["updatedTime"]
    item["entryPrice"] = fields.get("entryPrice", item["avgPrice"])  # the WebSocket page's name for avgPrice
    item.setdefault("tpslMode", "Full" if category in CONTRACT_CATEGORIES else "")
    if category == "option":
        for greek in ("delta", "gamma", "vega", "theta"):
            item.setdefault(greek, "0")
    return item


def wallet_item(n: int, seq: int, fields: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    item = dict(previous) if previous else {
        "accountType": "UNIFIED", "totalEquity": "10000.12", "totalWalletBalance": "10000.12",
        "totalMarginBalance": "10000.12", "totalAvailableBalance": "9000.5", "totalPerpUPL": "0.1",
        "totalInitialMargin": "30", "totalMaintenanceMargin": "1.5", "accountIMRate": "0.003",
        "accountMMRate": "0.0001", "accountLTV": "0",
        "coin": [
            {
                "coin": "USDT", "equity": "10000.123456789", "usdValue": "10000.12", "walletBalance": "10000.123456789",
                "availableToWithdraw": "9000.5", "availableToBorrow": "", "borrowAmount": "0", "accruedInterest": "0",
                "totalOrderIM": "0", "totalPositionIM": "30", "totalPositionMM": "1.5", "unrealisedPnl": "0.1",
                "cumRealisedPnl": "12.5", "locked": "0", "bonus": "0", "collateralSwitch": True,
                "marginCollateral": True,
            }
        ],
    }  # fmt: skip
    item.update(fields)
    return item


BUILDERS = {"order": order_item, "execution": execution_item, "position": position_item, "wallet": wallet_item}


class LedgerEntry(TypedDict):
    """One private item as the simulator wrote it: the record a test judges delivery against."""

    n: int  # 1, 2, ... in the order emitted
    id: str  # the frame's `id`
    topic: str  # order, execution, position or wallet
    creationTime: int
    item: dict[str, Any]


class PrivateState:
    """Every private item the simulator emitted, kept whether or not a socket listened: the truth REST serves."""

    def __init__(self) -> None:
        self.ledger: list[LedgerEntry] = []
        self.orders: dict[str, dict[str, Any]] = {}  # orderId -> latest state
        self.order_updates: dict[str, list[dict[str, Any]]] = {}  # orderId -> every state, oldest first
        self.executions: dict[str, dict[str, Any]] = {}  # execId -> execution
        self.positions: dict[tuple[str, str, int], dict[str, Any]] = {}  # (category, symbol, positionIdx) -> latest
        self.wallets: dict[str, dict[str, Any]] = {}  # accountType -> latest
        self.first_seen: dict[object, int] = {}  # store key -> `n` of its first item: a stable order for pages
        self.numbers = itertools.count(1)
        self.seqs = itertools.count(FIRST_SEQ)  # Bybit's cross sequence, shared by executions and positions

    def key(self, topic: str, n: int, fields: dict[str, Any]) -> tuple[object, dict[str, Any] | None]:
        """The store key the next `topic` item will have, and the state it is built over (None: a new one)."""
        if topic == "order":
            order_id = str(fields.get("orderId") or f"sim-order-{n}")
            return order_id, self.orders.get(order_id)
        if topic == "execution":
            return str(fields.get("execId") or f"sim-exec-{n}"), None
        if topic == "position":
            key = (fields.get("category", "linear"), fields.get("symbol", "BTCUSDT"), fields.get("positionIdx", 0))
            return key, self.positions.get(key)
        account = str(fields.get("accountType") or "UNIFIED")
        return account, self.wallets.get(account)

    def emit(self, topic: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Build the next `topic` frame from `fields` over the item's previous state, and keep it."""
        n = next(self.numbers)
        key, previous = self.key(topic, n, fields)
        seq = next(self.seqs) if topic in ("execution", "position") else 0
        item = BUILDERS[topic](n, seq, dict(fields), previous)
        message = {"id": f"sim-{n}", "topic": topic, "creationTime": now_ms(), "data": [item]}
        self.first_seen.setdefault((topic, key), n)
        if topic == "order":
            self.orders[str(key)] = item
            self.order_updates.setdefault(str(key), []).append(item)
        elif topic == "execution":
            self.executions[str(key)] = item
        elif topic == "position":
            self.positions[key] = item  # type: ignore[index]
        else:
            self.wallets[str(key)] = item
        self.ledger.append(
            {"n": n, "id": message["id"], "topic": topic, "creationTime": message["creationTime"], "item": item}
        )
        return message
