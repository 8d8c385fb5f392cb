"""Read-only API over the data plane: market state, balances, queues."""

from __future__ import annotations
