"""The simulator's private state: kept whether or not a socket listened, served over Bybit's signed REST endpoints."""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx
import pytest

from streaming.simulator.market import TickerGenerator
from tests.conftest import SIMULATOR_CREDENTIALS, wait_for

KEY, SECRET = SIMULATOR_CREDENTIALS
ORDERS = "/v5/order/realtime"
EXECUTIONS = "/v5/execution/list"


def signed_get(
    base: str,
    path: str,
    query: str,
    key: str = KEY,
    secret: str = SECRET,
    timestamp: int | None = None,
    recv_window: str = "5000",
) -> httpx.Response:
    """A GET signed as Bybit's Integration Guidance says, written out here rather than borrowed from the client."""
    stamp = str(timestamp if timestamp is not None else time.time_ns() // 1_000_000)
    sign = hmac.new(secret.encode(), f"{stamp}{key}{recv_window}{query}".encode(), hashlib.sha256).hexdigest()
    headers = {"X-BAPI-API-KEY": key, "X-BAPI-TIMESTAMP": stamp, "X-BAPI-RECV-WINDOW": recv_window, "X-BAPI-SIGN": sign}
    return httpx.get(f"{base}{path}?{query}", headers=headers, timeout=10)


def test_a_signed_request_is_answered_in_bybits_shape(simulator) -> None:
    sent = simulator.call(simulator.emit_order(symbol="ETHUSDT"))
    response = signed_get(simulator.rest_url, ORDERS, "category=linear&settleCoin=USDT")
    assert response.status_code == 200
    body = response.json()
    assert (body["retCode"], body["retMsg"], body["retExtInfo"]) == (0, "OK", {})
    assert isinstance(body["time"], int)
    assert body["result"]["category"] == "linear" and body["result"]["nextPageCursor"] == ""
    (order,) = body["result"]["list"]
    assert order == {k: v for k, v in sent["data"][0].items() if k != "category"}  # REST lists name it once
    assert response.headers["X-Bapi-Limit"] == "50" and response.headers["X-Bapi-Limit-Status"] == "49"


def test_a_wrong_signature_is_10004(simulator) -> None:
    body = signed_get(simulator.rest_url, ORDERS, "category=spot", secret="not-the-secret").json()
    assert body["retCode"] == 10004
    assert body["retMsg"] == "Error sign, please check your signature generation algorithm."


def test_a_query_changed_after_signing_is_10004(simulator) -> None:
    stamp = str(time.time_ns() // 1_000_000)
    sign = hmac.new(SECRET.encode(), f"{stamp}{KEY}5000category=spot".encode(), hashlib.sha256).hexdigest()
    headers = {"X-BAPI-API-KEY": KEY, "X-BAPI-TIMESTAMP": stamp, "X-BAPI-RECV-WINDOW": "5000", "X-BAPI-SIGN": sign}
    response = httpx.get(f"{simulator.rest_url}{ORDERS}?category=linear&symbol=BTCUSDT", headers=headers)
    assert response.json()["retCode"] == 10004


@pytest.mark.parametrize("offset_ms", [-6000, 1500])
def test_a_timestamp_outside_the_recv_window_is_10002(simulator, offset_ms: int) -> None:
    """Accepted only when server_time - recv_window <= timestamp < server_time + 1000."""
    stamp = time.time_ns() // 1_000_000 + offset_ms
    body = signed_get(simulator.rest_url, ORDERS, "category=spot", timestamp=stamp).json()
    assert body["retCode"] == 10002
    wider = signed_get(simulator.rest_url, ORDERS, "category=spot", timestamp=stamp, recv_window="20000").json()
    assert wider["retCode"] == (0 if offset_ms < 0 else 10002)


def test_an_unknown_key_is_10003(simulator) -> None:
    body = signed_get(simulator.rest_url, ORDERS, "category=spot", key="nobody", secret="whatever").json()
    assert (body["retCode"], body["retMsg"]) == (10003, "API key is invalid.")


def test_pages_return_every_execution_exactly_once(simulator) -> None:
    """Executions emitted while a client pages (newer than its cursor) neither repeat nor shift a page."""
    first = [simulator.call(simulator.emit_execution())["data"][0]["execId"] for _ in range(23)]
    seen: list[str] = []
    cursor, pages = "", 0
    while True:
        query = "category=linear&limit=5" + (f"&cursor={cursor}" if cursor else "")
        result = signed_get(simulator.rest_url, EXECUTIONS, query).json()["result"]
        seen += [e["execId"] for e in result["list"]]
        pages += 1
        simulator.call(simulator.emit_execution())  # arrives while paging
        cursor = result["nextPageCursor"]
        if not cursor:
            break
    assert pages == 5
    assert sorted(seen) == sorted(first) and len(seen) == len(set(seen))


def test_the_store_keeps_events_emitted_while_no_socket_listened(simulator) -> None:
    assert not simulator.clients
    order = simulator.call(simulator.emit_order(symbol="SOLUSDT", category="spot"))["data"][0]
    execution = simulator.call(simulator.emit_execution(orderId=order["orderId"], category="spot"))["data"][0]
    simulator.call(simulator.emit_position(symbol="ETHUSDT", size="2"))
    simulator.call(simulator.emit_wallet(totalEquity="42"))
    orders = signed_get(simulator.rest_url, ORDERS, "category=spot").json()["result"]["list"]
    assert [o["orderId"] for o in orders] == [order["orderId"]]
    executions = signed_get(simulator.rest_url, EXECUTIONS, "category=spot").json()["result"]["list"]
    assert [e["execId"] for e in executions] == [execution["execId"]]
    positions = signed_get(simulator.rest_url, "/v5/position/list", "category=linear&settleCoin=USDT").json()
    assert [(p["symbol"], p["size"]) for p in positions["result"]["list"]] == [("ETHUSDT", "2")]
    wallets = signed_get(simulator.rest_url, "/v5/account/wallet-balance", "accountType=UNIFIED").json()
    assert wallets["result"]["list"][0]["totalEquity"] == "42"
    ledger = httpx.get(f"{simulator.rest_url}/control/ledger").json()["result"]
    assert [(e["n"], e["topic"]) for e in ledger] == [(1, "order"), (2, "execution"), (3, "position"), (4, "wallet")]
    assert ledger == simulator.ledger
    assert httpx.get(f"{simulator.rest_url}/control/ledger?topic=wallet&after=3").json()["result"] == ledger[3:]


def test_open_only_selects_open_or_recently_closed_orders(simulator) -> None:
    working = simulator.call(simulator.emit_order(symbol="BTCUSDT"))["data"][0]["orderId"]
    done = simulator.call(simulator.emit_order(symbol="BTCUSDT"))["data"][0]["orderId"]
    simulator.call(simulator.emit_order(orderId=done, orderStatus="Filled"))

    def listed(query: str) -> list[str]:
        return [o["orderId"] for o in signed_get(simulator.rest_url, ORDERS, query).json()["result"]["list"]]

    assert listed("category=linear&symbol=BTCUSDT") == [working]
    assert listed("category=linear&symbol=BTCUSDT&openOnly=1") == [done]
    assert listed(f"category=linear&orderId={done}") == [done]  # openOnly is ignored for an order asked by id
    refused = signed_get(simulator.rest_url, ORDERS, "category=linear").json()
    assert refused["retCode"] == 10001  # linear needs symbol, baseCoin or settleCoin


def test_an_execution_window_over_seven_days_is_10001(simulator) -> None:
    end = time.time_ns() // 1_000_000
    query = f"category=linear&startTime={end - 8 * 86_400_000}&endTime={end}"
    assert signed_get(simulator.rest_url, EXECUTIONS, query).json()["retCode"] == 10001


def test_the_rate_limit_answers_10006_with_bybits_headers(simulator) -> None:
    limits = {"limits": {"/v5/position/list": 3}, "window": 1.0}
    assert httpx.post(f"{simulator.rest_url}/control/rest/limits", json=limits).status_code == 200
    query = "category=inverse"
    answered = [signed_get(simulator.rest_url, "/v5/position/list", query) for _ in range(3)]
    refused = signed_get(simulator.rest_url, "/v5/position/list", query)
    assert [r.json()["retCode"] for r in answered] == [0, 0, 0]
    assert [r.headers["X-Bapi-Limit-Status"] for r in answered] == ["2", "1", "0"]
    assert (refused.json()["retCode"], refused.json()["retMsg"]) == (10006, "Too many visits!")
    assert refused.headers["X-Bapi-Limit"] == "3" and refused.headers["X-Bapi-Limit-Status"] == "0"
    reset = int(refused.headers["X-Bapi-Limit-Reset-Timestamp"])
    assert time.time() * 1000 < reset <= time.time() * 1000 + 1000
    assert signed_get(simulator.rest_url, ORDERS, "category=spot").json()["retCode"] == 0  # per endpoint
    wait_for(lambda: signed_get(simulator.rest_url, "/v5/position/list", query).json()["retCode"] == 0, timeout=3)
    assert simulator.rest.answered[("/v5/position/list", 10006)] >= 1


def test_rest_faults_answer_10016_then_502_then_recover(simulator) -> None:
    assert httpx.post(f"{simulator.rest_url}/control/faults/rest", json={"mode": "error"}).status_code == 200
    assert signed_get(simulator.rest_url, ORDERS, "category=spot").json()["retCode"] == 10016
    simulator.call(simulator.control.rest_fault("http_5xx", 1))
    assert signed_get(simulator.rest_url, ORDERS, "category=spot").status_code == 502
    assert signed_get(simulator.rest_url, ORDERS, "category=spot").json()["retCode"] == 0


def test_private_items_carry_the_fields_bybit_lists(simulator) -> None:
    linear = simulator.call(simulator.emit_order(symbol="BTCUSDT", cumExecFee="0.5"))["data"][0]
    spot = simulator.call(simulator.emit_order(symbol="BTCUSDT", category="spot"))["data"][0]
    execution = simulator.call(simulator.emit_execution())["data"][0]
    position = simulator.call(simulator.emit_position())["data"][0]
    wallet = simulator.call(simulator.emit_wallet())
    for order in (linear, spot):
        assert {"reduceOnly", "cumFeeDetail", "cumExecQty", "orderStatus", "updatedTime", "createdTime"} <= set(order)
    assert linear["tpslMode"] == "Full" and "tpslMode" not in spot  # how clients tell contract from spot
    assert linear["cumFeeDetail"] == {"USDT": "0.5"}
    assert {"feeRate", "orderType", "execValue", "seq"} <= set(execution)
    fields = {"positionMM", "positionIM", "createdTime", "curRealisedPnl", "stopLoss", "takeProfit", "seq"}
    assert fields <= set(position)
    assert isinstance(wallet["creationTime"], int) and wallet["topic"] == "wallet"
    rest = signed_get(simulator.rest_url, ORDERS, "category=spot").json()["result"]["list"][0]
    assert "tpslMode" not in rest and "reduceOnly" in rest


def test_updates_grow_updated_time_and_seq_and_keep_created_time(simulator) -> None:
    states = [simulator.call(simulator.emit_order(orderId="o-1", orderStatus=s))["data"][0]
              for s in ("New", "PartiallyFilled", "Filled")]  # fmt: skip
    stamps = [int(s["updatedTime"]) for s in states]
    assert stamps == sorted(set(stamps))
    assert {s["createdTime"] for s in states} == {states[0]["createdTime"]}
    assert [s["cumExecQty"] for s in states] == ["0", "0.005", "0.010"]
    assert simulator.private.order_updates["o-1"] == states
    seqs = [simulator.call(simulator.emit_position(size=str(n)))["data"][0]["seq"] for n in range(1, 4)]
    assert seqs == sorted(set(seqs))


def test_spot_tickers_carry_usd_index_price_and_no_best_bid_or_ask() -> None:
    spot = TickerGenerator("spot", "tickers.BTCUSDT", seed=1).next()["data"]
    assert "usdIndexPrice" in spot and not {"bid1Price", "ask1Price", "bid1Size", "ask1Size"} & set(spot)
    linear = TickerGenerator("linear", "tickers.BTCUSDT", seed=1).next()["data"]
    assert "bid1Price" in linear and "usdIndexPrice" not in linear
