"""Benchmark: how fast one simulator process pushes mixed market data to one loopback client.

The simulator runs as its own process (`manage.py bybit_simulator --rate max`). Two clients
read from it in turn: a raw socket that only counts WebSocket frames (so the figure is the
simulator's, not the client's), and a plain `websockets` client (what a Python consumer gets).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from streaming.simulator.market import BOOK_INTERVALS

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = 60  # per category: 60 trades + 60 books + 60 tickers on linear


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def topics() -> list[str]:
    names = [f"SYM{i:04d}USDT" for i in range(1, SYMBOLS + 1)]
    return [f"publicTrade.{s}" for s in names] + [f"orderbook.50.{s}" for s in names] + [f"tickers.{s}" for s in names]


def start_simulator(port: int, symbols: int = SYMBOLS, rate: str = "max") -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SECRET_KEY": "bench", "LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [sys.executable, "manage.py", "bybit_simulator", "--port", str(port), "--control-port", str(free_port()),
         "--rate", rate, "--symbols", str(symbols)],
        cwd=ROOT, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the simulator did not start")


def mask(payload: bytes) -> bytes:
    """A client-to-server text frame (clients must mask)."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def raw_client(port: int, seconds: float) -> float:
    """Count frames with no per-message objects: the simulator's own rate."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v5/public/linear HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    all_topics = topics()
    for start in range(0, len(all_topics), 10):
        writer.write(mask(json.dumps({"op": "subscribe", "args": all_topics[start : start + 10]}).encode()))
    buffer, frames, started = b"", 0, 0.0
    deadline = None
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        buffer += chunk
        pos, size = 0, len(buffer)
        while pos + 2 <= size:
            length = buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if pos + 4 > size:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if pos + 10 > size:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
            if pos + head + length > size:
                break
            pos += head + length
            frames += 1
        buffer = buffer[pos:]
        now = time.perf_counter()
        if deadline is None and frames > 1000:  # warmed up: start the clock
            deadline, started, frames = now + seconds, now, 0
        elif deadline is not None and now >= deadline:
            break
    writer.close()
    return frames / (time.perf_counter() - started)


async def websockets_client(port: int, seconds: float) -> float:
    async with connect(f"ws://127.0.0.1:{port}/v5/public/linear", compression=None, max_queue=None,
                       ping_interval=None) as ws:  # fmt: skip
        all_topics = topics()
        for start in range(0, len(all_topics), 10):
            await ws.send(json.dumps({"op": "subscribe", "args": all_topics[start : start + 10]}))
        for _ in range(1000):
            await ws.recv()
        started, frames = time.perf_counter(), 0
        deadline = started + seconds
        while time.perf_counter() < deadline:
            await ws.recv()
            frames += 1
        return frames / (time.perf_counter() - started)


async def receive_cpu(port: int, symbols: int, seconds: float) -> float:
    """CPU microseconds a plain `websockets` client spends per frame on (b)'s feed: 50-level books of `symbols`.

    One end of the gateway's floor: it cannot read a frame for less than this.
    """
    async with connect(f"ws://127.0.0.1:{port}/v5/public/linear", compression=None, max_queue=None,
                       ping_interval=None) as ws:  # fmt: skip
        books = [f"orderbook.50.SYM{i:04d}USDT" for i in range(1, symbols + 1)]
        for start in range(0, len(books), 10):
            await ws.send(json.dumps({"op": "subscribe", "args": books[start : start + 10]}))
        for _ in range(2000):  # the snapshots and the subscribe replies
            await ws.recv()
        started, cpu0, frames = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - started < seconds:
            await ws.recv()
            frames += 1
        return (time.process_time() - cpu0) / frames * 1e6


async def receive_cpu_direct(port: int, symbols: int, seconds: float) -> float:
    """As `receive_cpu`, with the gateway's own reader (streaming.wsread): what reading a frame costs it."""
    from streaming.wsread import DirectConnection

    frames = 0

    def count(_message: str | bytes) -> None:
        nonlocal frames
        frames += 1

    async with connect(f"ws://127.0.0.1:{port}/v5/public/linear", compression=None, ping_interval=None,
                       create_connection=DirectConnection) as ws:  # fmt: skip
        assert ws.read_directly(count)
        books = [f"orderbook.50.SYM{i:04d}USDT" for i in range(1, symbols + 1)]
        for start in range(0, len(books), 10):
            await ws.send(json.dumps({"op": "subscribe", "args": books[start : start + 10]}))
        while frames < 2000:
            await asyncio.sleep(0.01)
        started, cpu0, frames0 = time.perf_counter(), time.process_time(), frames
        while time.perf_counter() - started < seconds:
            await asyncio.sleep(0.05)
        return (time.process_time() - cpu0) / (frames - frames0) * 1e6


def floor_receive(symbols: int = 200, seconds: float = 5.0, direct: bool = False, per_s: int | None = None) -> float:
    """`receive_cpu` (or `receive_cpu_direct`) against its own simulator: `per_s` frames a second, or as fast as read.

    The rate matters: at (b)'s rate a read wakes up for fewer frames than at full speed, and a
    frame costs 1.3x (websockets) to 2x (streaming.wsread) as much (measured on this machine).
    """
    port = free_port()
    # `--rate 1` is Bybit's cadence: a linear 50-level book every 20 ms.
    rate = "max" if per_s is None else f"{per_s * BOOK_INTERVALS['linear'][50] / symbols:.3f}"
    process = start_simulator(port, symbols, rate)
    try:
        measure = receive_cpu_direct if direct else receive_cpu
        return round(asyncio.run(measure(port, symbols, seconds)), 2)
    finally:
        process.terminate()
        process.wait(10)


def run(seconds: float = 5.0) -> dict[str, Any]:
    port = free_port()
    process = start_simulator(port)
    try:
        raw = asyncio.run(raw_client(port, seconds))
        plain = asyncio.run(websockets_client(port, seconds))
    finally:
        process.terminate()
        process.wait(10)
    return {"sim_msgs_per_s": round(raw), "client_msgs_per_s": round(plain)}


if __name__ == "__main__":
    print(run(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0))
