"""Market data is Bybit-shaped, deterministic, and accountable message by message."""

from __future__ import annotations

from decimal import Decimal

from streaming.simulator import Simulator
from streaming.simulator.market import BookGenerator, TickerGenerator
from tests.simclient import BybitClient, with_simulator


class ReferenceBook:
    """The simplest correct book: dicts of price -> size, replaced by snapshots, patched by deltas."""

    def __init__(self) -> None:
        self.bids: dict[Decimal, str] = {}
        self.asks: dict[Decimal, str] = {}

    def apply(self, frame: dict) -> None:
        data = frame["data"]
        if frame["type"] == "snapshot":
            self.bids, self.asks = {}, {}
        for side, levels in ((self.bids, data["b"]), (self.asks, data["a"])):
            for price, size in levels:
                if size == "0":
                    side.pop(Decimal(price), None)
                else:
                    side[Decimal(price)] = size


def test_snapshot_and_deltas_rebuild_the_simulators_own_book() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await client.request("subscribe", ["orderbook.50.BTCUSDT"])
        frames = await client.data("orderbook.50.BTCUSDT", 60)
        await client.send({"op": "unsubscribe", "args": ["orderbook.50.BTCUSDT"]})
        while "topic" in (message := await client.recv()):  # deltas sent before the unsubscribe took effect
            frames.append(message)
        assert message["op"] == "unsubscribe" and message["success"]
        assert frames[0]["type"] == "snapshot" and {f["type"] for f in frames[1:]} == {"delta"}
        updates = [f["data"]["u"] for f in frames]
        assert updates == list(range(updates[0], updates[0] + len(frames)))
        seqs = [f["data"]["seq"] for f in frames]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(frames)
        book = ReferenceBook()
        for frame in frames:
            book.apply(frame)
        bids, asks = sim.generators[("linear", "orderbook.50.BTCUSDT")].book()
        assert book.bids == {Decimal(p): s for p, s in bids.items()}
        assert book.asks == {Decimal(p): s for p, s in asks.items()}
        assert len(book.bids) == len(book.asks) == 50
        assert max(book.bids) < min(book.asks)
        await client.close()

    with_simulator(test, rate=10.0)


def test_trades_carry_a_contiguous_sequence_per_topic() -> None:
    async def test(sim: Simulator) -> None:
        client = await BybitClient.open(f"{sim.url}/v5/public/spot")
        await client.request("subscribe", ["publicTrade.ETHUSDT"])
        frames = await client.data("publicTrade.ETHUSDT", 10)
        seqs = [t["seq"] for f in frames for t in f["data"]]
        assert seqs == list(range(1, len(seqs) + 1))
        trade = frames[0]["data"][0]
        assert set(trade) >= {"T", "s", "S", "v", "p", "L", "i", "BT"} and isinstance(trade["p"], str)
        await client.close()

    with_simulator(test, rate=10.0)


def test_linear_tickers_send_a_snapshot_then_changed_fields_spot_only_snapshots() -> None:
    linear = TickerGenerator("linear", "tickers.BTCUSDT", seed=3)
    first, second = linear.next(), linear.next()
    assert first["type"] == "snapshot" and "fundingRate" in first["data"]
    assert second["type"] == "delta" and "fundingRate" not in second["data"]
    assert second["cs"] == first["cs"] + 1
    merged = {**first["data"], **second["data"]}
    assert merged == linear.state
    spot = TickerGenerator("spot", "tickers.BTCUSDT", seed=3)
    assert {spot.next()["type"] for _ in range(3)} == {"snapshot"}


def test_the_same_seed_gives_the_same_market() -> None:
    def stream(seed: int) -> list[dict]:
        generator = BookGenerator("linear", "orderbook.50.ETHUSDT", seed)
        return [{k: v for k, v in generator.next()["data"].items()} for _ in range(20)]

    assert stream(7) == stream(7)
    assert stream(7) != stream(8)


def test_depth_one_books_are_snapshots_only() -> None:
    generator = BookGenerator("linear", "orderbook.1.BTCUSDT", seed=1)
    frames = [generator.next() for _ in range(5)]
    assert {f["type"] for f in frames} == {"snapshot"}
    assert all(len(f["data"]["b"]) == len(f["data"]["a"]) == 1 for f in frames)


def test_every_category_serves_its_topics() -> None:
    async def test(sim: Simulator) -> None:
        cases = {
            "spot": ["orderbook.200.BTCUSDT", "kline.5.BTCUSDT", "tickers.ETHUSDT"],
            "linear": ["allLiquidation.BTCUSDT", "kline.D.SOLUSDT"],
            "inverse": ["orderbook.1000.BTCUSD", "tickers.ETHUSD"],
            "option": ["orderbook.25.BTC-26DEC26-100000-C", "publicTrade.BTC", "tickers.ETH-26DEC26-4000-C"],
        }
        for category, topics in cases.items():
            client = await BybitClient.open(f"{sim.url}/v5/public/{category}")
            assert (await client.request("subscribe", topics))["success"] is True, category
            for topic in topics:
                await client.data(topic, 1)
            await client.close()

    with_simulator(test, rate=20.0)


def test_a_second_subscriber_first_gets_a_snapshot_of_the_running_book() -> None:
    async def test(sim: Simulator) -> None:
        first = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await first.request("subscribe", ["orderbook.50.ETHUSDT"])
        await first.data("orderbook.50.ETHUSDT", 5)
        second = await BybitClient.open(f"{sim.url}/v5/public/linear")
        await second.request("subscribe", ["orderbook.50.ETHUSDT"])
        greeting, following = await second.data("orderbook.50.ETHUSDT", 2)
        assert greeting["type"] == "snapshot" and greeting["data"]["u"] > 1
        assert following["data"]["u"] == greeting["data"]["u"] + 1
        await first.close()
        await second.close()

    with_simulator(test, rate=10.0)
