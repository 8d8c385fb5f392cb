"""The simulator's request checks, without a socket: which auth and subscribe requests Bybit refuses, and how."""

from __future__ import annotations

import hashlib
import hmac

from streaming.simulator.market import DEFAULT_SYMBOLS
from streaming.simulator.server import auth_refusal, subscribe_refusal

KEYS = {"key": "secret"}
NOW = 1_700_000_000_000


def signed(expires: int, secret: str = "secret") -> str:
    """Computed here independently of the simulator: hex HMAC-SHA256 of GET/realtime + expires."""
    return hmac.new(secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()


def test_auth_accepts_a_good_signature_with_expires_as_number_or_string() -> None:
    """A signed request whose `expires` lies ahead is accepted, whichever JSON type carries it."""
    expires = NOW + 10_000
    assert auth_refusal(["key", expires, signed(expires)], KEYS, NOW) is None
    assert auth_refusal(["key", str(expires), signed(expires)], KEYS, NOW) is None


def test_auth_refuses_bad_params_before_looking_at_the_key() -> None:
    """Malformed args and an `expires` past or over an hour ahead are Params Error, even for unknown keys."""
    expires = NOW + 10_000
    assert auth_refusal(["key", expires], KEYS, NOW) == "Params Error"
    assert auth_refusal({"key": "key"}, KEYS, NOW) == "Params Error"
    assert auth_refusal(["key", "soon", signed(expires)], KEYS, NOW) == "Params Error"
    assert auth_refusal(["key", NOW - 1, signed(NOW - 1)], KEYS, NOW) == "Params Error"
    late = NOW + 3_600_001
    assert auth_refusal(["key", late, signed(late)], KEYS, NOW) == "Params Error"
    assert auth_refusal(["other", NOW - 1, signed(NOW - 1)], {}, NOW) == "Params Error"


def test_auth_refuses_an_unknown_key_and_a_wrong_signature() -> None:
    """A key not configured, and a signature made with another secret, get Bybit's two distinct errors."""
    expires = NOW + 10_000
    assert auth_refusal(["other", expires, signed(expires)], KEYS, NOW) == "API key is invalid."
    assert auth_refusal(["key", expires, signed(expires, "wrong")], KEYS, NOW) == "Invalid signature."


def test_spot_refuses_more_than_ten_args_in_one_request() -> None:
    """Spot's limit is per request: ten topics pass, eleven do not; linear has no such limit."""
    ten = [f"publicTrade.SYM{i:04d}USDT" for i in range(1, 11)]
    symbols = {**DEFAULT_SYMBOLS, "spot": [t.split(".")[1] for t in ten] + ["BTCUSDT"]}
    assert subscribe_refusal("spot", set(), ten, False, symbols) is None
    assert subscribe_refusal("spot", set(), [*ten, "publicTrade.BTCUSDT"], False, symbols) == "args size >10"
    linear = {**DEFAULT_SYMBOLS, "linear": symbols["spot"]}
    assert subscribe_refusal("linear", set(), [*ten, "publicTrade.BTCUSDT"], False, linear) is None


def test_derivatives_refuse_a_connection_past_21000_characters_of_args() -> None:
    """The character limit counts what the connection already holds plus the request."""
    topics = [f"tickers.S{i:05d}USDT" for i in range(1, 1201)]  # 18 characters each
    symbols = {**DEFAULT_SYMBOLS, "linear": [t.split(".")[1] for t in topics], "option": []}
    live, more = set(topics[:1100]), topics[1100:]  # 19,800 characters held, 1,800 asked
    assert subscribe_refusal("linear", set(), more, False, symbols) is None
    assert subscribe_refusal("linear", set(topics[:1050]), more, False, symbols) is None
    assert subscribe_refusal("linear", live, more, False, symbols) == "args length >21000"
    assert subscribe_refusal("option", live, more, False, symbols) == "args length >21000"


def test_a_request_is_refused_whole_naming_its_first_bad_topic() -> None:
    """Unknown symbols, depths and topics, and topics already live, are named one at a time, in order."""
    live = {"publicTrade.BTCUSDT"}
    args = ["tickers.BTCUSDT", "orderbook.500.BTCUSDT", "publicTrade.BTCUSDT"]
    assert subscribe_refusal("linear", live, args, False, DEFAULT_SYMBOLS) == (
        "error:handler not found,topic:orderbook.500.BTCUSDT"
    )
    assert subscribe_refusal("linear", live, ["tickers.BTCUSDT", "publicTrade.BTCUSDT"], False, DEFAULT_SYMBOLS) == (
        "error:already subscribed,topic:publicTrade.BTCUSDT"
    )
    assert subscribe_refusal("inverse", set(), ["tickers.BTCUSDT"], False, DEFAULT_SYMBOLS) == (
        "error:handler not found,topic:tickers.BTCUSDT"
    )


def test_private_topics_need_auth_first() -> None:
    """Known private topics are refused until the connection authenticated; unknown ones are not found."""
    assert subscribe_refusal("private", set(), ["order", "execution.linear"], False, DEFAULT_SYMBOLS) == (
        "error:topic:order needs auth first"
    )
    assert subscribe_refusal("private", set(), ["order", "execution.linear"], True, DEFAULT_SYMBOLS) is None
    assert subscribe_refusal("private", set(), ["orders"], True, DEFAULT_SYMBOLS) == (
        "error:handler not found,topic:orders"
    )
