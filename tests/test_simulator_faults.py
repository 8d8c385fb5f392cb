"""Each injected fault is what a client of Bybit would see."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.simulator import Simulator
from tests.simclient import BybitClient, with_simulator


@pytest.mark.parametrize("abrupt", [False, True])
def test_drop_closes_every_connection(abrupt: bool) -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.request("subscribe", ["orderbook.1.BTCUSDT"])
        assert await sim.drop_connections(abrupt) == 1
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await client.recv()
        assert (closed.value.rcvd is None) == abrupt  # no close frame when the TCP connection is aborted

    with_simulator(test)


def test_stall_sends_no_data_and_no_pong_then_resumes() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.request("subscribe", ["orderbook.1.BTCUSDT"])
        await sim.stall(0.5)
        await client.send({"op": "ping", "req_id": "p"})
        with pytest.raises(TimeoutError):
            while True:
                await client.recv(timeout=0.3)
        await client.data("orderbook.1.BTCUSDT", 2, timeout=2)
        await client.close()

    with_simulator(test)


def test_refuse_answers_503_then_accepts_again() -> None:
    async def test(sim: Simulator) -> None:
        await sim.refuse(0.3)
        with pytest.raises(InvalidStatus) as refused:
            await BybitClient.open(f"{sim.url}/v5/public/spot")
        assert refused.value.response.status_code == 503
        deadline = asyncio.get_running_loop().time() + 5
        while True:  # accepted again once the window is over
            try:
                client = await BybitClient.open(f"{sim.url}/v5/public/spot")
                break
            except InvalidStatus:
                assert asyncio.get_running_loop().time() < deadline, "still refusing"
        await client.close()
        assert sim.refused >= 1

    with_simulator(test)


def test_refuse_with_a_path_refuses_only_that_path() -> None:
    async def test(sim: Simulator) -> None:
        await sim.refuse(5, "/v5/public/linear")
        with pytest.raises(InvalidStatus) as refused:
            await BybitClient.open(f"{sim.url}/v5/public/linear")
        assert refused.value.response.status_code == 503
        spot = await BybitClient.open(f"{sim.url}/v5/public/spot")
        private = await BybitClient.open(f"{sim.url}/v5/private")
        await spot.close()
        await private.close()
        assert sim.refused == 1

    with_simulator(test)


def test_ignored_requests_get_no_reply_until_the_fault_ends() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await sim.control.ignore_requests(0.5)
        await client.send({"op": "subscribe", "req_id": "ignored", "args": ["publicTrade.BTCUSDT"]})
        assert (await client.request("ping"))["ret_msg"] == "pong"  # pings are still answered
        with pytest.raises(TimeoutError):
            await client.reply("subscribe", timeout=0.2)
        assert sim.subscribes[("linear", "publicTrade.BTCUSDT")] == 0  # not applied either
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline and sim.faults.is_ignoring_requests():
            await asyncio.sleep(0.05)
        reply = await client.request("subscribe", ["publicTrade.BTCUSDT"], req_id="answered")
        assert (reply["req_id"], reply["success"]) == ("answered", True)
        await client.close()

    with_simulator(test)


def test_delayed_pongs_arrive_late() -> None:
    async def test(sim: Simulator) -> None:
        await sim.delay_pongs(0.4)
        client = await BybitClient.open(f"{sim.url}/v5/public/spot")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.request("ping")
        assert loop.time() - started >= 0.4
        await client.close()

    with_simulator(test)


def test_malformed_frames_reach_the_client() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        for kind in ("invalid_json", "binary", "unknown_topic", "missing_fields", "wrong_types", "oversized"):
            await sim.send_malformed(kind)
            raw = await asyncio.wait_for(client.ws.recv(), 5)
            if kind == "binary":
                assert isinstance(raw, bytes)
            elif kind == "invalid_json":
                with pytest.raises(json.JSONDecodeError):
                    json.loads(raw)
            elif kind == "oversized":
                assert len(raw) > 5 * 2**20
            else:
                assert isinstance(json.loads(raw), dict)
        with pytest.raises(ValueError, match="unknown malformed kind"):
            await sim.send_malformed("nonsense")
        await client.close()

    with_simulator(test)


def test_gap_skips_one_update_id_and_restart_sends_u_1() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.request("subscribe", ["orderbook.50.BTCUSDT"])
        frames = await client.data("orderbook.50.BTCUSDT", 3)
        await sim.gap("linear", "orderbook.50.BTCUSDT")
        frames += await client.data("orderbook.50.BTCUSDT", 2)
        updates = [f["data"]["u"] for f in frames]
        assert any(b - a == 2 for a, b in itertools.pairwise(updates))
        await sim.restart_book("linear", "orderbook.50.BTCUSDT")
        (restarted,) = await client.data("orderbook.50.BTCUSDT", 1)
        assert (restarted["type"], restarted["data"]["u"]) == ("snapshot", 1)
        await client.close()

    with_simulator(test)


def test_control_api_triggers_an_order_and_reports_counts() -> None:
    async def test(sim: Simulator) -> None:
        async def http(method: str, path: str, body: str = "") -> tuple[int, dict]:
            reader, writer = await asyncio.open_connection("127.0.0.1", sim.control_port)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            response = await reader.read()
            writer.close()
            head, _, payload = response.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(payload)

        status, body = await http("POST", "/control/orders", '{"symbol": "XRPUSDT", "orderStatus": "Filled"}')
        assert status == 200 and body["result"]["data"][0]["orderStatus"] == "Filled"
        status, body = await http("GET", "/control/stats")
        assert status == 200 and body["result"]["connections"] == []
        assert (await http("POST", "/control/nothing"))[0] == 404
        assert (await http("POST", "/control/faults/stall", "{bad json"))[0] == 400

    with_simulator(test)
