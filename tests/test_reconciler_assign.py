"""Topics are spread over sockets within Bybit's limits and never move once placed."""

from __future__ import annotations

from streaming.protocol import ARGS_CHARS_PER_CONNECTION, TOPICS_PER_CONNECTION
from streaming.reconciler import assign


def test_new_topics_fill_one_socket_per_category() -> None:
    plan = assign({"linear": {"a", "b"}, "spot": {"c"}}, {})
    assert plan == {"linear-1": ("linear", {"a", "b"}), "spot-1": ("spot", {"c"})}


def test_topics_stay_on_their_socket_and_unwanted_ones_leave() -> None:
    current = {"linear-1": ("linear", {"a", "b"}), "linear-2": ("linear", {"c"})}
    plan = assign({"linear": {"b", "c", "d"}}, current)
    assert plan["linear-2"] == ("linear", {"c"})
    assert plan["linear-1"] == ("linear", {"b", "d"})


def test_a_category_outgrowing_one_connection_gets_another() -> None:
    topics = {f"orderbook.50.SYM{i:04d}USDT" for i in range(TOPICS_PER_CONNECTION + 5)}
    plan = assign({"linear": topics}, {})
    assert sorted(plan) == ["linear-1", "linear-2"]
    assert set().union(*(t for _, t in plan.values())) == topics
    for _, placed in plan.values():
        assert len(placed) <= TOPICS_PER_CONNECTION
        assert sum(map(len, placed)) <= ARGS_CHARS_PER_CONNECTION


def test_sockets_with_nothing_left_are_dropped_from_the_plan() -> None:
    assert assign({}, {"spot-1": ("spot", {"x"})}) == {}


def test_a_symbols_topics_share_a_socket_so_books_spread_over_sockets() -> None:
    symbols = [f"SYM{i:04d}USDT" for i in range(TOPICS_PER_CONNECTION)]
    topics = {f"{kind}{s}" for s in symbols for kind in ("orderbook.50.", "tickers.", "publicTrade.")}
    plan = assign({"linear": topics}, {})
    assert len(plan) == 3
    for _, placed in plan.values():
        books = sum(t.startswith("orderbook.") for t in placed)
        assert TOPICS_PER_CONNECTION // 3 - 1 <= books <= TOPICS_PER_CONNECTION // 3 + 1
    home = {t: name for name, (_, placed) in plan.items() for t in placed}
    split = [s for s in symbols if len({home[f"{k}{s}"] for k in ("orderbook.50.", "tickers.", "publicTrade.")}) > 1]
    assert len(split) <= len(plan) - 1
