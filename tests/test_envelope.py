"""Frames become envelopes exactly as the README's event contract says; bad frames are named."""

from __future__ import annotations

import orjson
import pytest

from streaming.envelope import ControlReply, DataFrame, Envelopes, Malformed
from streaming.publisher import encode_publish


def envelope(frame: dict, category: str = "linear") -> dict:
    result = Envelopes("run").handle(orjson.dumps(frame).decode(), category)
    assert isinstance(result, DataFrame), result
    (event,) = result.events
    return orjson.loads(event.body)


def test_orderbook_delta_carries_sequence_fields_and_data_verbatim() -> None:
    data = {"s": "BTCUSDT", "b": [["100.5", "0"]], "a": [["101", "2.5"]], "u": 42, "seq": 9001}
    frame = {"topic": "orderbook.50.BTCUSDT", "type": "delta", "ts": 1700000000000, "cts": 1699999999990, "data": data}
    body = envelope(frame)
    assert body["class"] == "orderbook"
    assert (body["category"], body["symbol"], body["type"]) == ("linear", "BTCUSDT", "delta")
    assert (body["u"], body["seq"], body["cts"], body["exchange_ts"]) == (42, 9001, 1699999999990, 1700000000000)
    assert body["data"] == data
    assert body["id"] == "run-1-0" and body["trace_id"] == "run-1"


def test_routing_keys_follow_class_category_symbol() -> None:
    handler = Envelopes("r")
    frames = {
        "trade.spot.ETHUSDT": ({"topic": "publicTrade.ETHUSDT", "ts": 1, "data": [{"p": "1"}]}, "spot"),
        "orderbook.linear.BTCUSDT.200": ({"topic": "orderbook.200.BTCUSDT", "ts": 1, "data": {"u": 1}}, "linear"),
        "kline.inverse.BTCUSD.D": ({"topic": "kline.D.BTCUSD", "ts": 1, "data": [{}]}, "inverse"),
        "ticker.linear.BTCUSDT": ({"topic": "tickers.BTCUSDT", "ts": 1, "cs": 7, "data": {}}, "linear"),
        "liquidation.linear.BTCUSDT": ({"topic": "allLiquidation.BTCUSDT", "ts": 1, "data": [{}]}, "linear"),
    }
    for routing_key, (frame, category) in frames.items():
        (event,) = handler.handle(orjson.dumps(frame).decode(), category).events
        assert event.routing_key == routing_key


def test_private_frame_becomes_one_event_per_item_routed_by_category_and_symbol() -> None:
    frame = {
        "id": "abc",
        "topic": "order",
        "creationTime": 1700000000000,
        "data": [
            {"category": "linear", "symbol": "BTCUSDT", "orderId": "1"},
            {"category": "spot", "symbol": "ETHUSDT", "orderId": "2"},
        ],
    }
    result = Envelopes("r").handle(orjson.dumps(frame).decode(), "private")
    assert [e.routing_key for e in result.events] == ["order.linear.BTCUSDT", "order.spot.ETHUSDT"]
    assert all(e.private for e in result.events)
    bodies = [orjson.loads(e.body) for e in result.events]
    assert [b["data"]["orderId"] for b in bodies] == ["1", "2"]
    assert len({b["id"] for b in bodies}) == 2
    assert {b["trace_id"] for b in bodies} == {"r-1"}


def test_wallet_routes_by_account_type() -> None:
    frame = {"id": "w", "topic": "wallet", "creationTime": 1, "data": [{"accountType": "UNIFIED", "coin": []}]}
    (event,) = Envelopes("r").handle(orjson.dumps(frame).decode(), "private").events
    assert event.routing_key == "balance.UNIFIED" and event.event_class == "balance"


def test_control_replies_are_returned_not_published() -> None:
    pong = {"success": True, "ret_msg": "pong", "conn_id": "c", "op": "ping"}
    result = Envelopes("r").handle(orjson.dumps(pong).decode(), "linear")
    assert isinstance(result, ControlReply) and result.message == pong


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\x01", "binary frame"),
        (b'{"topic": "\xc3"}', "invalid UTF-8"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"topic": "nosuch.BTCUSDT", "data": {}}', "unknown topic"),
        ('{"topic": "publicTrade.BTCUSDT"}', "missing data"),
        ('{"topic": 5, "data": {}}', "topic is not a string"),
        ('{"topic": "orderbook.50.BTCUSDT", "data": [1]}', "orderbook data is not an object"),
        ('{"hello": 1}', "neither a data frame nor a control message"),
    ],
)
def test_malformed_public_frames_are_named(raw: str | bytes, reason: str) -> None:
    result = Envelopes("r").handle(raw, "linear")
    assert isinstance(result, Malformed) and result.reason == reason


def test_a_private_frame_on_an_unknown_topic_is_malformed() -> None:
    result = Envelopes("r").handle(orjson.dumps({"topic": "publicTrade.BTCUSDT", "data": []}).decode(), "private")
    assert isinstance(result, Malformed) and result.reason == "unknown topic"


@pytest.mark.parametrize(
    ("frame", "reason", "field"),
    [
        ({"topic": "order", "data": {"x": 1}}, "order data is not a list", "data"),
        ({"topic": "order", "data": [{"symbol": "BTCUSDT"}]}, "order item without category", "category"),
        ({"topic": "order", "data": [{"category": "linear", "symbol": ""}]}, "order item without symbol", "symbol"),
        ({"topic": "order", "data": ["x"]}, "order item is not an object", "item"),
        ({"topic": "wallet", "data": [{"coin": []}]}, "balance item without accountType", "accountType"),
    ],
)
def test_a_private_item_that_cannot_be_routed_is_quarantined_whole(frame: dict, reason: str, field: str) -> None:
    result = Envelopes("r").handle(orjson.dumps(frame).decode(), "private")
    assert isinstance(result, DataFrame)
    (bad,) = result.quarantined
    assert (bad.reason, bad.field) == (reason, field)
    (event,) = result.events
    body = orjson.loads(event.body)
    assert event.routing_key == f"{result.event_class}.unknown" and event.private
    assert body["quarantine"] == {"reason": reason, "field": field}
    assert body["data"] == (frame["data"][0] if isinstance(frame["data"], list) else frame["data"])
    assert event.id == body["id"] and event.id.startswith(f"{result.event_class}:unknown:")


def test_one_bad_item_leaves_its_siblings_routed_and_market_state_sees_only_them() -> None:
    good = [{"accountType": "UNIFIED", "coin": []}, {"accountType": "CONTRACT", "coin": []}]
    frame = {"topic": "wallet", "creationTime": 1, "data": [good[0], {"coin": []}, good[1]]}
    result = Envelopes("r").handle(orjson.dumps(frame).decode(), "private")
    assert [e.routing_key for e in result.events] == ["balance.UNIFIED", "balance.unknown", "balance.CONTRACT"]
    assert [q.index for q in result.quarantined] == [1]
    assert result.parsed["data"] == good


PRIVATE_FRAMES = [
    {"id": "e1", "topic": "execution", "creationTime": 1700000000001, "data": [
        {"category": "linear", "symbol": "BTCUSDT", "execId": "x-1", "orderId": "o-1", "execQty": "0.01"},
        {"category": "spot", "symbol": "ETHUSDT", "execId": "x-2", "orderId": "o-2", "execQty": "1"},
    ]},
    {"id": "o1", "topic": "order", "creationTime": 1700000000002, "data": [
        {"category": "linear", "symbol": "BTCUSDT", "orderId": "o-1", "updatedTime": "1700000000000",
         "orderStatus": "PartiallyFilled", "cumExecQty": "0.01"},
    ]},
    {"id": "p1", "topic": "position", "creationTime": 1700000000003, "data": [
        {"category": "linear", "symbol": "BTCUSDT", "positionIdx": 0, "seq": 42, "size": "0.01"},
    ]},
    {"id": "w1", "topic": "wallet", "creationTime": 1700000000004, "data": [
        {"accountType": "UNIFIED", "coin": [{"coin": "USDT", "walletBalance": "1"}]},
    ]},
]  # fmt: skip


def private_ids(envelopes: Envelopes, frame: dict) -> list[str]:
    result = envelopes.handle(orjson.dumps(frame).decode(), "private")
    assert isinstance(result, DataFrame), result
    ids = [orjson.loads(e.body)["id"] for e in result.events]
    assert ids == [e.id for e in result.events]  # the AMQP message_id is the envelope's id
    return ids


def test_private_ids_come_from_content_so_two_instances_agree() -> None:
    """An owner and its standby (or a restart) give one Bybit event one id: consumers dedupe on it."""
    owner, standby = Envelopes("owner-run"), Envelopes("standby-run")
    standby.handle('{"topic": "publicTrade.BTCUSDT", "ts": 1, "data": [{}]}', "linear")  # its frame count differs
    for frame in PRIVATE_FRAMES:
        assert private_ids(owner, frame) == private_ids(standby, frame)


def test_private_ids_name_the_fields_bybit_identifies_events_by() -> None:
    ids = [i for frame in PRIVATE_FRAMES for i in private_ids(Envelopes("r"), frame)]
    assert ids[:4] == [
        "exec:x-1",
        "exec:x-2",
        "order:o-1:1700000000000:PartiallyFilled:0.01",
        "position:linear:BTCUSDT:0:42",
    ]
    assert ids[4].startswith("wallet:UNIFIED:1700000000004:")


def test_a_new_state_of_the_same_order_gets_a_new_id() -> None:
    first, filled = (
        {"category": "linear", "symbol": "BTCUSDT", "orderId": "o-1", "updatedTime": t, "orderStatus": s,
         "cumExecQty": q}
        for t, s, q in (("1", "New", "0"), ("2", "Filled", "0.01"))
    )  # fmt: skip
    envelopes = Envelopes("r")
    ids = [private_ids(envelopes, {"topic": "order", "data": [item]}) for item in (first, filled, first)]
    assert ids[0] != ids[1] and ids[0] == ids[2]


def test_wallet_updates_in_the_same_millisecond_keep_distinct_ids() -> None:
    frames = [
        {"topic": "wallet", "creationTime": 5, "data": [{"accountType": "UNIFIED", "coin": [{"coin": c}]}]}
        for c in ("USDT", "BTC")
    ]
    first, second = (private_ids(Envelopes("r"), f) for f in frames)
    assert first != second


def test_an_absurdly_long_order_id_still_gives_an_id_amqp_can_carry_and_instances_agree_on() -> None:
    item = {"category": "linear", "symbol": "BTCUSDT", "orderId": "o" * 300, "updatedTime": "1",
            "orderStatus": "New", "cumExecQty": "0"}  # fmt: skip
    frame = {"topic": "order", "data": [item]}
    (first,) = private_ids(Envelopes("one"), frame)
    (second,) = private_ids(Envelopes("two"), frame)
    assert first == second and first.startswith("order:hash:") and len(first.encode()) <= 255
    result = Envelopes("one").handle(orjson.dumps(frame).decode(), "private")
    assert isinstance(result, DataFrame)
    encode_publish(1, b"\x00", result.events[0], 131072)  # the broker can take it: no ValueError


def test_private_items_without_id_fields_get_a_content_hash_not_a_run_id() -> None:
    frame = {"topic": "execution", "data": [{"category": "linear", "symbol": "BTCUSDT", "execQty": "1"}]}
    (first,) = private_ids(Envelopes("one"), frame)
    (second,) = private_ids(Envelopes("two"), {**frame, "data": [dict(reversed(frame["data"][0].items()))]})
    assert first == second and "one" not in first
