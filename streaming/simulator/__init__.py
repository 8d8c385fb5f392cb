"""The Bybit V5 simulator: protocol server, control and faults, market data and private events."""

from __future__ import annotations

from streaming.simulator.server import Simulator

__all__ = ["Simulator"]
