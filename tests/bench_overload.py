"""Overload: the simulator at max rate, far past what the path sustains, with and without conflation.

`make bench` runs it; alone: `python -m tests.bench_overload`. The consumer checks that every
book it rebuilds follows on (`u` continuity after each snapshot) and times each event from
Bybit's `ts` to its receipt.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tests import bench_gateway

KEYS = ("gateway_per_s", "frames_in_per_s", "latency_p50_ms", "latency_p99_ms", "read_lag_p99_ms", "lost", "dropped",
        "gaps_seen", "cpu_us_per_event", "received_unique", "events")  # fmt: skip
NEVER = str(10**9)  # a GATEWAY_CONFLATE_AT no hand-off reaches: conflation off


def run(seconds: float = 20.0, rate: str = "2") -> dict[str, Any]:
    conflating = bench_gateway.run_path(200, rate, seconds)
    backpressure = bench_gateway.run_path(200, rate, seconds, {"GATEWAY_CONFLATE_AT": NEVER})
    return {"conflating": {k: conflating[k] for k in KEYS}, "backpressure_only": {k: backpressure[k] for k in KEYS}}


if __name__ == "__main__":
    os.environ.update(bench_gateway.env())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsgateway.settings")
    import django

    django.setup()
    print(run(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0, sys.argv[2] if len(sys.argv) > 2 else "2"))
