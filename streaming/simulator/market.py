"""Market data of the Bybit simulator, deterministic under a seed.

Each public topic has one generator whose `next()` returns Bybit's frame as a dict. What a
consumer uses to prove nothing was lost, per topic:

| topic | contiguous field |
| --- | --- |
| `orderbook.{depth}.{symbol}` | `data.u`, +1 per message (`u = 1` after a restart) |
| `publicTrade.{symbol}` | each trade's `seq`, +1 per trade across messages |
| `tickers.{symbol}` | top-level `cs`, +1 per message |
| `kline.{interval}.{symbol}` | each candle's `timestamp`, +1 ms per message |
| `allLiquidation.{symbol}` | each item's `T`, +1 ms per message |
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable
from typing import Any

from subscriptions.topics import KLINE_INTERVALS, ORDERBOOK_DEPTHS

DEFAULT_SYMBOLS = {
    "spot": ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
    "linear": ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
    "inverse": ["BTCUSD", "ETHUSD"],
    "option": ["BTC-26DEC26-100000-C", "BTC-26DEC26-100000-P", "ETH-26DEC26-4000-C"],
}
# Bybit's push intervals in seconds (bybit-v5-protocol.md); trades are real time.
BOOK_INTERVALS = {
    "spot": {1: 0.01, 50: 0.02, 200: 0.2, 1000: 0.2},
    "linear": {1: 0.01, 50: 0.02, 200: 0.1, 1000: 0.2},
    "inverse": {1: 0.01, 50: 0.02, 200: 0.1, 1000: 0.2},
    "option": {25: 0.02, 100: 0.1},
}
TRADE_INTERVAL = 0.1
TICKER_INTERVAL = {"spot": 0.05, "linear": 0.1, "inverse": 0.1, "option": 0.1}
KLINE_INTERVAL = 1.0
LIQUIDATION_INTERVAL = 0.5
TICK = 0.5  # price step of simulated books


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_universe(per_category: int) -> dict[str, list[str]]:
    """A larger universe for load: SYM0001USDT... on spot and linear, plus the defaults."""
    universe = {category: list(symbols) for category, symbols in DEFAULT_SYMBOLS.items()}
    for category in ("spot", "linear"):
        universe[category] += [f"SYM{i:04d}USDT" for i in range(1, per_category + 1)]
    return universe


def base_coin(symbol: str) -> str:
    return symbol.split("-")[0]


def topic_valid(category: str, topic: str, symbols: dict[str, list[str]]) -> bool:
    """True if Bybit would serve this public topic on this category's socket."""
    head, _, rest = topic.partition(".")
    universe = symbols.get(category, [])
    if head in ("orderbook", "kline"):
        param, _, symbol = rest.partition(".")
        if head == "orderbook":
            ok = param.isdigit() and int(param) in ORDERBOOK_DEPTHS[category]
        else:
            ok = param in KLINE_INTERVALS and category != "option"
        return ok and symbol in universe
    if head == "publicTrade":
        if category == "option":
            return rest in {base_coin(s) for s in universe}
        return rest in universe
    if head == "tickers":
        return rest in universe
    if head == "allLiquidation":
        return category in ("linear", "inverse") and rest in universe
    return False


def push_interval(category: str, topic: str) -> float:
    head, _, rest = topic.partition(".")
    if head == "orderbook":
        return BOOK_INTERVALS[category][int(rest.partition(".")[0])]
    return {"publicTrade": TRADE_INTERVAL, "kline": KLINE_INTERVAL, "allLiquidation": LIQUIDATION_INTERVAL}.get(
        head, TICKER_INTERVAL[category]
    )


def price_fmt(value: float) -> str:
    return f"{value:.2f}"


class Generator:
    """Base: a seeded random source and a mid price per topic."""

    def snapshot(self) -> dict[str, Any] | None:
        """What a new subscriber gets first when the topic is already running (Bybit sends a snapshot)."""
        return None

    def __init__(self, category: str, topic: str, seed: int) -> None:
        self.category = category
        self.topic = topic
        self.symbol = topic.rsplit(".", 1)[-1]
        self.rng = random.Random(seed * 1_000_003 + zlib.crc32(f"{category}:{topic}".encode()))
        # Every topic of a symbol starts from the same price, so trades and books agree.
        self.mid = 100.0 + random.Random(seed * 7 + zlib.crc32(self.symbol.encode())).random() * 50_000

    def walk(self) -> float:
        self.mid = max(1.0, self.mid + self.rng.choice((-TICK, 0.0, TICK)))
        return self.mid

    def next(self) -> dict[str, Any]:
        raise NotImplementedError


class BookGenerator(Generator):
    """An order book of exactly `depth` levels a side: snapshot first, then deltas."""

    def __init__(self, category: str, topic: str, seed: int) -> None:
        super().__init__(category, topic, seed)
        self.depth = int(topic.split(".")[1])
        self.u = 0
        self.seq = self.rng.randrange(10**9, 2 * 10**9)
        self.skip_next = False
        self.restart_next = False
        self.reset()

    def reset(self) -> None:
        mid = round(self.mid / TICK) * TICK
        # Price lists kept best-first beside the dicts: no scan or sort per change.
        self.bid_prices = [price_fmt(mid - TICK * (i + 1)) for i in range(self.depth)]
        self.ask_prices = [price_fmt(mid + TICK * (i + 1)) for i in range(self.depth)]
        self.bids = {p: self.size() for p in self.bid_prices}
        self.asks = {p: self.size() for p in self.ask_prices}
        self.sent_snapshot = False

    def size(self) -> str:
        return SIZES[int(self.rng.random() * 256)]

    def levels(self, side: dict[str, str], reverse: bool) -> list[list[str]]:
        prices = self.bid_prices if reverse else self.ask_prices
        return [[p, side[p]] for p in prices]

    def next(self) -> dict[str, Any]:
        self.seq += self.rng.randrange(1, 50)
        if self.restart_next:
            self.restart_next, self.u = False, 0
            self.reset()
        if self.skip_next:
            self.skip_next = False
            self.u += 1  # the gap: one update id never sent
        self.u += 1
        if not self.sent_snapshot or self.depth == 1:
            self.sent_snapshot = True
            if self.depth == 1:
                self.mutate()
            data = {"s": self.symbol, "b": self.levels(self.bids, True), "a": self.levels(self.asks, False)}
            kind = "snapshot"
        else:
            bids, asks = self.mutate()
            data, kind = {"s": self.symbol, "b": bids, "a": asks}, "delta"
        data.update(u=self.u, seq=self.seq)
        return {"topic": self.topic, "type": kind, "ts": now_ms(), "data": data, "cts": now_ms() - 1}

    def snapshot(self) -> dict[str, Any] | None:
        """The current book for a new subscriber, at the last `u` sent (None before the first message)."""
        if not self.sent_snapshot:
            return None
        data = {"s": self.symbol, "b": self.levels(self.bids, True), "a": self.levels(self.asks, False)}
        data.update(u=self.u, seq=self.seq)
        return {"topic": self.topic, "type": "snapshot", "ts": now_ms(), "data": data, "cts": now_ms() - 1}

    def mutate(self) -> tuple[list[list[str]], list[list[str]]]:
        """Change a few levels; keep `depth` levels a side. Returns the delta's (bids, asks)."""
        r = self.rng.random
        bids: list[list[str]] = []
        asks: list[list[str]] = []
        for _ in range(1 + int(r() * 3)):
            is_bid = r() < 0.5
            side, prices, changes = (self.bids, self.bid_prices, bids) if is_bid else (self.asks, self.ask_prices, asks)
            index = int(r() * len(prices))
            price = prices[index]
            if r() < 0.25 and len(prices) > 1:
                # A level leaves; a new one appears beyond the worst, so the depth stays the same.
                del side[price]
                prices.pop(index)
                changes.append([price, "0"])
                fresh = price_fmt(float(prices[-1]) + (-TICK if is_bid else TICK))
                prices.append(fresh)
                side[fresh] = self.size()
                changes.append([fresh, side[fresh]])
            else:
                side[price] = self.size()
                changes.append([price, side[price]])
        return bids, asks

    def book(self) -> tuple[dict[str, str], dict[str, str]]:
        return dict(self.bids), dict(self.asks)


TICK_DIRECTIONS = ("PlusTick", "ZeroPlusTick", "MinusTick", "ZeroMinusTick")
# Sizes are drawn from a table: a single random() per choice keeps the load mode fast.
SIZES = tuple(f"{(i * 7919) % 100_000 / 1000 + 0.001:.3f}" for i in range(256))


class TradeGenerator(Generator):
    def __init__(self, category: str, topic: str, seed: int) -> None:
        super().__init__(category, topic, seed)
        self.seq = 0

    def next(self) -> dict[str, Any]:
        ts, r = now_ms(), self.rng.random
        trades = []
        for _ in range(1 + int(r() * 3)):
            self.seq += 1
            x = r()
            self.mid = max(1.0, self.mid + (TICK if x < 0.33 else -TICK if x > 0.66 else 0.0))
            trades.append(
                {
                    "T": ts,
                    "s": self.symbol,
                    "S": "Buy" if x < 0.5 else "Sell",
                    "v": SIZES[int(r() * 256)],
                    "p": f"{self.mid:.2f}",
                    "L": TICK_DIRECTIONS[int(x * 4)],
                    "i": str(self.seq),
                    "BT": False,
                    "seq": self.seq,
                }
            )
        return {"topic": self.topic, "type": "snapshot", "ts": ts, "data": trades}


class TickerGenerator(Generator):
    """Linear/inverse: a snapshot, then deltas of the changed fields. Spot and option: snapshots.

    Fields per category as Bybit's ticker page lists them: only contracts carry `bid1Price`/`ask1Price`;
    spot carries `usdIndexPrice`; options name their best bid/ask `bidPrice`/`askPrice` with IVs and greeks.
    """

    def __init__(self, category: str, topic: str, seed: int) -> None:
        super().__init__(category, topic, seed)
        self.cs = 0
        self.state: dict[str, str] = {}

    def full(self) -> dict[str, str]:
        last = self.walk()
        fields = {
            "symbol": self.symbol,
            "lastPrice": price_fmt(last),
            "highPrice24h": price_fmt(last * 1.02),
            "lowPrice24h": price_fmt(last * 0.98),
            "volume24h": f"{self.rng.randrange(1, 10**6)}.000",
            "turnover24h": f"{self.rng.randrange(1, 10**9)}.00",
        }
        if self.category == "spot":
            fields.update(prevPrice24h=price_fmt(last * 0.99), price24hPcnt="0.0101", usdIndexPrice=price_fmt(last))
        elif self.category == "option":
            fields.update(
                bidPrice=price_fmt(last - TICK), bidSize="1.000", bidIv="0.5", askPrice=price_fmt(last + TICK),
                askSize="1.000", askIv="0.52", markPrice=price_fmt(last), indexPrice=price_fmt(last),
                markPriceIv="0.51", underlyingPrice=price_fmt(last), openInterest="100", totalVolume="1000",
                totalTurnover=price_fmt(last * 1000), delta="0.5", gamma="0.0001", vega="10", theta="-5",
                predictedDeliveryPrice="0", change24h="0.0101",
            )  # fmt: skip
        else:
            fields.update(
                prevPrice24h=price_fmt(last * 0.99), price24hPcnt="0.0101", bid1Price=price_fmt(last - TICK),
                bid1Size="1.000", ask1Price=price_fmt(last + TICK), ask1Size="1.000", tickDirection="PlusTick",
                prevPrice1h=price_fmt(last), markPrice=price_fmt(last), indexPrice=price_fmt(last),
                openInterest="1000", openInterestValue=price_fmt(last * 1000),
                nextFundingTime=str(now_ms() + 3_600_000), fundingRate="0.0001",
            )  # fmt: skip
        return fields

    def snapshot(self) -> dict[str, Any] | None:
        if not self.state:
            return None
        return {"topic": self.topic, "type": "snapshot", "cs": self.cs, "ts": now_ms(), "data": dict(self.state)}

    def moved(self) -> dict[str, str]:
        """The fields a price move changes."""
        last = self.walk()
        return {
            "symbol": self.symbol,
            "lastPrice": price_fmt(last),
            "bid1Price": price_fmt(last - TICK),
            "ask1Price": price_fmt(last + TICK),
            "bid1Size": SIZES[int(self.rng.random() * 256)],
            "ask1Size": SIZES[int(self.rng.random() * 256)],
        }

    def next(self) -> dict[str, Any]:
        self.cs += 1
        if self.category in ("linear", "inverse") and self.state:
            changed = self.moved()
            self.state.update(changed)
            data, kind = changed, "delta"
        else:
            self.state = self.full()
            data, kind = dict(self.state), "snapshot"
        return {"topic": self.topic, "type": kind, "cs": self.cs, "ts": now_ms(), "data": data}


class KlineGenerator(Generator):
    def __init__(self, category: str, topic: str, seed: int) -> None:
        super().__init__(category, topic, seed)
        self.interval = topic.split(".")[1]
        self.stamp = now_ms()

    def next(self) -> dict[str, Any]:
        self.stamp += 1
        price = self.walk()
        start = self.stamp - self.stamp % 60_000
        candle = {
            "start": start, "end": start + 59_999, "interval": self.interval,
            "open": price_fmt(price), "close": price_fmt(price), "high": price_fmt(price + TICK),
            "low": price_fmt(price - TICK), "volume": "1.000", "turnover": price_fmt(price),
            "confirm": False, "timestamp": self.stamp,
        }  # fmt: skip
        return {"topic": self.topic, "type": "snapshot", "ts": self.stamp, "data": [candle]}


class LiquidationGenerator(Generator):
    def __init__(self, category: str, topic: str, seed: int) -> None:
        super().__init__(category, topic, seed)
        self.stamp = now_ms()

    def next(self) -> dict[str, Any]:
        self.stamp += 1
        item = {"T": self.stamp, "s": self.symbol, "S": self.rng.choice(("Buy", "Sell")), "v": "0.010",
                "p": price_fmt(self.walk())}  # fmt: skip
        return {"topic": self.topic, "type": "snapshot", "ts": self.stamp, "data": [item]}


GENERATORS: dict[str, Callable[[str, str, int], Generator]] = {
    "orderbook": BookGenerator,
    "publicTrade": TradeGenerator,
    "tickers": TickerGenerator,
    "kline": KlineGenerator,
    "allLiquidation": LiquidationGenerator,
}


def generator_for(category: str, topic: str, seed: int) -> Generator:
    return GENERATORS[topic.partition(".")[0]](category, topic, seed)
