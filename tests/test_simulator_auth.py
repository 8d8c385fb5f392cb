"""Private streams need Bybit's HMAC auth, checked against the configured keys."""

from __future__ import annotations

import hashlib
import hmac
import time

from streaming.simulator import Simulator
from tests.simclient import BybitClient, with_simulator

KEY, SECRET = "test-key", "test-secret"


def signed(expires: int, secret: str = SECRET) -> str:
    """Computed here independently of the project: hex HMAC-SHA256 of GET/realtime + expires."""
    return hmac.new(secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()


def in_ms(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


def test_valid_signature_authenticates_and_unlocks_private_topics() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/private")
        expires = in_ms(10)
        reply = await client.request("auth", [KEY, expires, signed(expires)])
        assert reply == {"success": True, "ret_msg": "", "op": "auth", "conn_id": reply["conn_id"]}
        sub = await client.request("subscribe", ["order", "wallet"])
        assert (sub["success"], sub["ret_msg"]) == (True, "")
        sent = await sim.emit_order(symbol="ETHUSDT")
        (frame,) = await client.data("order", 1)
        assert frame == sent and frame["data"][0]["symbol"] == "ETHUSDT"
        await client.close()

    with_simulator(test, credentials={KEY: SECRET})


def test_wrong_signature_wrong_key_and_expired_requests_are_refused() -> None:
    async def test(sim: Simulator) -> None:
        expires = in_ms(10)
        cases = {
            "bad signature": [KEY, expires, signed(expires, "not-the-secret")],
            "unknown key": ["other-key", expires, signed(expires)],
            "expired": [KEY, in_ms(-5), signed(in_ms(-5))],
        }
        for name, args in cases.items():
            client = await BybitClient.open(f"{sim.url}/v5/private")
            reply = await client.request("auth", args)
            assert reply["success"] is False, name
            sub = await client.request("subscribe", ["order"])
            assert sub["success"] is False and "needs auth" in sub["ret_msg"], name
            await client.close()

    with_simulator(test, credentials={KEY: SECRET})


def test_private_topic_before_auth_is_refused() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/private")
        reply = await client.request("subscribe", ["position"])
        assert (reply["success"], reply["ret_msg"]) == (False, "error:topic:position needs auth first")
        await client.close()

    with_simulator(test, credentials={KEY: SECRET})


def test_reject_auth_fault_refuses_good_credentials() -> None:
    async def test(sim: Simulator) -> None:
        await sim.reject_auth(True)
        client = await BybitClient.open(f"{sim.url}/v5/private")
        expires = in_ms(10)
        assert (await client.request("auth", [KEY, expires, signed(expires)]))["success"] is False
        await client.close()

    with_simulator(test, credentials={KEY: SECRET})
