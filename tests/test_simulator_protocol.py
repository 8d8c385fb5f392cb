"""The simulator answers subscribe, unsubscribe, ping and bad requests exactly as Bybit does."""

from __future__ import annotations

import asyncio

from streaming.simulator import Simulator
from tests.simclient import BybitClient, with_simulator


def test_public_subscribe_is_acknowledged_in_bybits_shape() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        reply = await client.request("subscribe", ["orderbook.50.BTCUSDT", "publicTrade.BTCUSDT"], req_id="abc")
        assert reply == {"success": True, "ret_msg": "subscribe", "conn_id": reply["conn_id"], "op": "subscribe",
                         "req_id": "abc"}  # fmt: skip
        (snapshot,) = await client.data("orderbook.50.BTCUSDT", 1)
        assert snapshot["type"] == "snapshot" and len(snapshot["data"]["b"]) == 50
        await client.close()

    with_simulator(test)


def test_unknown_symbol_topic_and_depth_are_refused_with_handler_not_found() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        for topic in (
            "orderbook.50.NOPEUSDT",
            "orderbook.500.BTCUSDT",
            "nosuch.BTCUSDT",
            "publicTrade.btcusdt",
            "order",
        ):
            reply = await client.request("subscribe", [topic], req_id="e1")
            assert reply["success"] is False
            assert reply["ret_msg"] == f"error:handler not found,topic:{topic}"
        await client.close()

    with_simulator(test)


def test_duplicate_subscription_is_refused_as_already_subscribed() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.request("subscribe", ["orderbook.1.ETHUSDT"])
        reply = await client.request("subscribe", ["orderbook.1.ETHUSDT"])
        assert (reply["success"], reply["ret_msg"]) == (False, "error:already subscribed,topic:orderbook.1.ETHUSDT")
        await client.close()

    with_simulator(test)


def test_spot_refuses_more_than_ten_args_per_request() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/spot")
        topics = [f"kline.{i}.BTCUSDT" for i in ("1", "3", "5", "15", "30", "60", "120", "240", "360", "720", "D")]
        reply = await client.request("subscribe", topics)
        assert (reply["success"], reply["ret_msg"]) == (False, "args size >10")
        assert (await client.request("subscribe", topics[:10]))["success"] is True
        await client.close()

    with_simulator(test, symbols={"spot": ["BTCUSDT"]})


def test_linear_refuses_args_beyond_21000_characters_per_connection() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        topics = [f"publicTrade.{s}" for s in sim.symbols["linear"]]
        accepted = 0
        for start in range(0, len(topics), 10):
            reply = await client.request("subscribe", topics[start : start + 10])
            if not reply["success"]:
                assert reply["ret_msg"] == "args length >21000"
                break
            accepted += 10
        assert sum(map(len, topics[:accepted])) <= 21_000 < sum(map(len, topics[: accepted + 10]))
        await client.close()

    with_simulator(test, symbols={"linear": [f"LONGSYMBOLNAME{i:05d}USDT" for i in range(1200)]}, rate=0.01)


def test_unsubscribe_stops_the_data() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.request("subscribe", ["orderbook.1.BTCUSDT"])
        await client.data("orderbook.1.BTCUSDT", 2)
        reply = await client.request("unsubscribe", ["orderbook.1.BTCUSDT"], req_id="u")
        assert (reply["success"], reply["op"], reply["req_id"]) == (True, "unsubscribe", "u")
        sent = sim.sent[("linear", "orderbook.1.BTCUSDT")]
        await client.request("ping")  # a round trip after which nothing more is pushed
        await asyncio.sleep(0)
        assert sim.sent[("linear", "orderbook.1.BTCUSDT")] == sent
        await client.close()

    with_simulator(test)


def test_public_and_private_pongs_have_their_distinct_shapes() -> None:
    async def test(sim: Simulator) -> None:
        public = await BybitClient.open(f"{sim.url}/v5/public/spot")
        pong = await public.request("ping", req_id="100001")
        assert pong == {
            "success": True,
            "ret_msg": "pong",
            "conn_id": pong["conn_id"],
            "op": "ping",
            "req_id": "100001",
        }
        private = await BybitClient.open(f"{sim.url}/v5/private")
        pong = await private.request("ping", req_id="100002")
        assert (pong["op"], pong["req_id"]) == ("pong", "100002") and pong["args"][0].isdigit()
        await public.close()
        await private.close()

    with_simulator(test)


def test_bad_requests_get_bybits_errors_and_the_socket_stays_open() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.send("this is not json")
        reply = await client.reply()
        assert reply["success"] is False and reply["ret_msg"].startswith("Failed to decode incoming data")
        assert (await client.request("dance", []))["ret_msg"] == "error:invalid op"
        assert (await client.request("ping"))["ret_msg"] == "pong"
        await client.close()

    with_simulator(test)


def test_a_silent_connection_is_closed_after_the_heartbeat_timeout() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await asyncio.wait_for(client.ws.wait_closed(), 5)
        assert client.ws.close_code == 1000 and client.ws.close_reason == "heartbeat timeout"

    with_simulator(test, ping_timeout=0.5)


def test_unknown_path_is_404() -> None:
    async def test(sim: Simulator) -> None:
        from websockets.exceptions import InvalidStatus

        try:
            await BybitClient.open(f"{sim.url}/v5/public/futures")
        except InvalidStatus as exc:
            assert exc.response.status_code == 404
        else:
            raise AssertionError("the connection should have been refused")

    with_simulator(test)
