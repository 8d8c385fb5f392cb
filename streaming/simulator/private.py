"""Private account events of the Bybit simulator: order, execution, position and wallet items in Bybit's shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streaming.simulator.market import now_ms


def order_item(n: int, fields: dict[str, Any]) -> dict[str, Any]:
    ts = str(now_ms())
    item = {
        "category": "linear", "symbol": "BTCUSDT", "orderId": f"sim-order-{n}", "orderLinkId": "",
        "side": "Buy", "orderType": "Limit", "price": "30000.00", "qty": "0.010", "orderStatus": "New",
        "timeInForce": "GTC", "cumExecQty": "0", "cumExecValue": "0", "cumExecFee": "0", "avgPrice": "",
        "leavesQty": "0.010", "createdTime": ts, "updatedTime": ts, "rejectReason": "EC_NoError",
    }  # fmt: skip
    item.update(fields)
    return item


def execution_item(n: int, fields: dict[str, Any]) -> dict[str, Any]:
    item = {
        "category": "linear", "symbol": "BTCUSDT", "execId": f"sim-exec-{n}", "orderId": f"sim-order-{n}",
        "orderLinkId": "", "side": "Buy", "execPrice": "30000.00", "execQty": "0.010", "execFee": "0.018",
        "execType": "Trade", "execTime": str(now_ms()), "isMaker": False, "leavesQty": "0",
    }  # fmt: skip
    item.update(fields)
    return item


def position_item(n: int, fields: dict[str, Any]) -> dict[str, Any]:
    item = {
        "category": "linear", "symbol": "BTCUSDT", "side": "Buy", "size": "0.010", "positionIdx": 0,
        "avgPrice": "30000.00", "markPrice": "30010.00", "positionValue": "300.00", "leverage": "10",
        "unrealisedPnl": "0.10", "cumRealisedPnl": "0", "liqPrice": "27000.00", "positionStatus": "Normal",
        "updatedTime": str(now_ms()), "seq": n,
    }  # fmt: skip
    item.update(fields)
    return item


def wallet_item(n: int, fields: dict[str, Any]) -> dict[str, Any]:
    coins = fields.pop("coin", None) or [
        {
            "coin": "USDT", "equity": "10000.123456789", "usdValue": "10000.12", "walletBalance": "10000.123456789",
            "availableToWithdraw": "9000.5", "borrowAmount": "0", "accruedInterest": "0", "totalOrderIM": "0",
            "totalPositionIM": "30", "totalPositionMM": "1.5", "unrealisedPnl": "0.1", "cumRealisedPnl": "12.5",
            "locked": "0", "bonus": "0", "collateralSwitch": True, "marginCollateral": True,
        }
    ]  # fmt: skip
    item = {
        "accountType": "UNIFIED", "totalEquity": "10000.12", "totalWalletBalance": "10000.12",
        "totalMarginBalance": "10000.12", "totalAvailableBalance": "9000.5", "totalPerpUPL": "0.1",
        "totalInitialMargin": "30", "totalMaintenanceMargin": "1.5", "accountIMRate": "0.003",
        "accountMMRate": "0.0001", "accountLTV": "0", "coin": coins,
    }  # fmt: skip
    item.update(fields)
    return item


PRIVATE_ITEMS: dict[str, Callable[[int, dict[str, Any]], dict[str, Any]]] = {
    "order": order_item,
    "execution": execution_item,
    "position": position_item,
    "wallet": wallet_item,
}
