"""`manage.py bybit_simulator`: a thin shell over streaming.simulator.Simulator."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from streaming.simulator import Simulator
from streaming.simulator.market import DEFAULT_SYMBOLS, make_universe


class Command(BaseCommand):
    help = (
        "Run the local Bybit V5 simulator (WebSocket on --port; control HTTP API and Bybit's private-state "
        "REST endpoints on --control-port)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.SIMULATOR_HOST)
        parser.add_argument("--port", type=int, default=settings.SIMULATOR_PORT)
        parser.add_argument("--control-port", type=int, default=settings.SIMULATOR_PORT + 1)
        parser.add_argument("--seed", type=int, default=settings.SIMULATOR_SEED)
        parser.add_argument(
            "--symbols", type=int, default=0, help="extra symbols per spot/linear category (SYM0001USDT...), for load"
        )
        parser.add_argument(
            "--rate", default="1", help="multiplier of Bybit's push cadence, or 'max' for as fast as clients read"
        )
        parser.add_argument("--ping-timeout", type=float, default=600.0, help="close sockets silent this long")
        parser.add_argument("--api-key", default=settings.BYBIT_API_KEY, help="accepted private key")
        parser.add_argument("--api-secret", default=settings.BYBIT_API_SECRET, help="its secret")

    def handle(self, *args: Any, **options: Any) -> None:
        rate = None if options["rate"] == "max" else float(options["rate"])
        credentials = {options["api_key"]: options["api_secret"]} if options["api_key"] else {}
        symbols = make_universe(options["symbols"]) if options["symbols"] else DEFAULT_SYMBOLS
        simulator = Simulator(
            host=options["host"],
            port=options["port"],
            control_port=options["control_port"],
            seed=options["seed"],
            symbols=symbols,
            rate=rate,
            credentials=credentials,
            ping_timeout=options["ping_timeout"],
        )

        async def run() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            async with simulator:
                await stop.wait()

        asyncio.run(run())
