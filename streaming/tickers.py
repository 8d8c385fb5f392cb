"""Full tickers from Bybit's deltas (linear/inverse send only the changed fields). Pure."""

from __future__ import annotations

from typing import Any


class Tickers:
    def __init__(self) -> None:
        self.state: dict[tuple[str, str], dict[str, Any]] = {}

    def apply(self, category: str, symbol: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Merge one message and return the complete ticker (a snapshot replaces it)."""
        key = (category, symbol)
        if kind == "snapshot" or key not in self.state:
            self.state[key] = dict(data)
        else:
            self.state[key].update(data)
        return self.state[key]
