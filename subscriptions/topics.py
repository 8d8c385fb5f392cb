"""The topic catalogue: (channel, category, symbol, depth/interval) -> Bybit topic, routing, queue.

Pure: no ORM, no settings. Routing keys follow ARCHITECTURE.md, `<class>.<category>.<symbol>`,
with a fourth segment for the order-book depth and the kline interval, so two services asking
for different depths of one symbol never receive each other's books. Private channels have no
category or symbol: their routing key is a binding pattern over every item the gateway routes
(`order.#` receives `order.linear.BTCUSDT`, `balance.#` receives `balance.UNIFIED`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CATEGORIES = ("spot", "linear", "inverse", "option")
EXCHANGE = "ws-gateway.events"
CONTROL_EXCHANGE = "ws-gateway.control"
CONTROL_ROUTING_KEY = "subscriptions.changed"
QUEUE_PREFIX = "ws-gateway"

ORDERBOOK_DEPTHS = {
    "spot": (1, 50, 200, 1000),
    "linear": (1, 50, 200, 1000),
    "inverse": (1, 50, 200, 1000),
    "option": (25, 100),
}
KLINE_INTERVALS = ("1", "3", "5", "15", "30", "60", "120", "240", "360", "720", "D", "W", "M")

SYMBOL_PATTERN = re.compile(r"^[A-Z0-9]{2,30}$")
# Options: BTC-27DEC24-50000-C, or with a settle coin suffix BTC-27DEC24-50000-C-USDT.
OPTION_SYMBOL_PATTERN = re.compile(r"^[A-Z0-9]{2,10}-[0-9]{1,2}[A-Z]{3}[0-9]{2}-[0-9.]{1,12}-[CP](-[A-Z0-9]{2,10})?$")
# Options publish trades per base coin (publicTrade.BTC).
BASE_COIN_PATTERN = re.compile(r"^[A-Z0-9]{2,6}$")
SERVICE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Any symbol of any category (paths and filters, where the category is not known first).
ANY_SYMBOL_PATTERN = re.compile(f"^(?:{SYMBOL_PATTERN.pattern[1:-1]}|{OPTION_SYMBOL_PATTERN.pattern[1:-1]})$")


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    event_class: str
    bybit: str
    private: bool
    categories: tuple[str, ...] = ()
    has_depth: bool = False
    has_interval: bool = False


CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in (
        Channel("trades", "trade", "publicTrade", False, CATEGORIES),
        Channel("ticker", "ticker", "tickers", False, CATEGORIES),
        Channel("orderbook", "orderbook", "orderbook", False, CATEGORIES, has_depth=True),
        Channel("kline", "kline", "kline", False, ("spot", "linear", "inverse"), has_interval=True),
        Channel("liquidation", "liquidation", "allLiquidation", False, ("linear", "inverse")),
        Channel("order", "order", "order", True),
        Channel("execution", "execution", "execution", True),
        Channel("position", "position", "position", True),
        Channel("balance", "balance", "wallet", True),
    )
}
EVENT_CLASSES = tuple(c.event_class for c in CHANNELS.values())
PRIVATE_CLASSES = tuple(c.event_class for c in CHANNELS.values() if c.private)
MARKET_CLASSES = tuple(c.event_class for c in CHANNELS.values() if not c.private)
CHANNEL_BY_BYBIT = {c.bybit: c for c in CHANNELS.values()}
# A channel may also be named by its event class ("trade" for "trades"): queue names, routing
# keys and `tail_events --class` all say the class, so people type it.
CHANNEL_ALIASES = {c.event_class: c.name for c in CHANNELS.values() if c.event_class != c.name}
CHANNEL_NAMES = (*CHANNELS, *CHANNEL_ALIASES)
UNKNOWN_CHANNEL = "'{input}' is not a valid choice; the channels are " + ", ".join(CHANNELS)


class TopicError(ValueError):
    """A subscription request Bybit would not serve; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Topic:
    channel: str
    event_class: str
    category: str
    symbol: str
    depth: int | None
    interval: str
    bybit_topic: str
    routing_key: str
    private: bool

    def queue_name(self, service_name: str) -> str:
        return queue_name(service_name, self.event_class)


def queue_name(service_name: str, event_class: str) -> str:
    return f"{QUEUE_PREFIX}.{service_name}.{event_class}"


def resolve(channel: str, category: str = "", symbol: str = "", depth: int | None = None, interval: str = "") -> Topic:
    """Validate a request against Bybit's rules and derive its topic; raise TopicError."""
    spec = channel_named(channel)
    channel = spec.name
    if spec.private:
        for field, value in (("category", category), ("symbol", symbol), ("depth", depth), ("interval", interval)):
            if value:
                raise TopicError(field, f"the private channel {channel!r} takes no {field}")
        return Topic(channel, spec.event_class, "", "", None, "", spec.bybit, f"{spec.event_class}.#", True)

    if not category:
        raise TopicError("category", f"channel {channel!r} needs a category")
    if category not in spec.categories:
        raise TopicError(
            "category", f"channel {channel!r} is not offered on {category!r}; use {', '.join(spec.categories)}"
        )
    if not symbol:
        raise TopicError("symbol", f"channel {channel!r} needs a symbol")
    check_symbol(channel, category, symbol)

    if spec.has_depth:
        allowed = ORDERBOOK_DEPTHS[category]
        if depth is None:
            raise TopicError("depth", f"orderbook needs a depth; {category} offers {', '.join(map(str, allowed))}")
        if depth not in allowed:
            raise TopicError("depth", f"depth {depth} is not offered on {category}; use {', '.join(map(str, allowed))}")
    elif depth is not None:
        raise TopicError("depth", f"channel {channel!r} takes no depth")

    if spec.has_interval:
        if interval not in KLINE_INTERVALS:
            raise TopicError("interval", f"interval {interval!r} is not offered; use {', '.join(KLINE_INTERVALS)}")
    elif interval:
        raise TopicError("interval", f"channel {channel!r} takes no interval")

    parts = [spec.bybit, *([str(depth)] if spec.has_depth else []), *([interval] if spec.has_interval else []), symbol]
    routing = [
        spec.event_class,
        category,
        symbol,
        *([str(depth)] if spec.has_depth else []),
        *([interval] if spec.has_interval else []),
    ]
    return Topic(
        channel, spec.event_class, category, symbol, depth, interval, ".".join(parts), ".".join(routing), False
    )


def channel_named(name: str) -> Channel:
    """The channel called `name`, or whose event class is `name`; TopicError listing every channel otherwise."""
    spec = CHANNELS.get(CHANNEL_ALIASES.get(name, name))
    if spec is None:
        raise TopicError("channel", UNKNOWN_CHANNEL.format(input=name[:40]))
    return spec


def check_symbol(channel: str, category: str, symbol: str) -> None:
    if category == "option" and channel == "trades":
        if not BASE_COIN_PATTERN.match(symbol):
            raise TopicError("symbol", f"option trades are per base coin (e.g. BTC), not {symbol!r}")
        return
    pattern = OPTION_SYMBOL_PATTERN if category == "option" else SYMBOL_PATTERN
    if not pattern.match(symbol):
        example = "BTC-27DEC24-50000-C" if category == "option" else "BTCUSDT"
        raise TopicError("symbol", f"{symbol!r} is not a Bybit {category} symbol (upper case, like {example})")


def check_service_name(name: str) -> None:
    if not SERVICE_NAME_PATTERN.fullmatch(name):
        raise TopicError(
            "service_name",
            "service names are 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
        )


def parse_bybit_topic(bybit_topic: str) -> tuple[Channel, str, int | None, str] | None:
    """Split a public Bybit topic into (channel, symbol, depth, interval); None if unknown."""
    head, _, rest = bybit_topic.partition(".")
    spec = CHANNEL_BY_BYBIT.get(head)
    if spec is None:
        return None
    if spec.private:
        return spec, "", None, ""
    if spec.has_depth or spec.has_interval:
        param, _, symbol = rest.partition(".")
        if not param or not symbol:
            return None
        if spec.has_depth:
            return (spec, symbol, int(param), "") if param.isdigit() else None
        return spec, symbol, None, param
    return (spec, rest, None, "") if rest else None
