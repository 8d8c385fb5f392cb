"""A TCP proxy in front of the local RabbitMQ that a test can stall, cut short, and speak through.

RabbitMQ itself never stalls, never sends connection.blocked without a node-wide alarm (which
would block every other test run on the machine), and never lets us see which frames a
client sent. The proxy forwards whole AMQP frames both ways, records them, and can: stop
forwarding (both ways, or only what the client sends), close every connection a set time
after it opened, and insert frames of its own into what RabbitMQ sends to the client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from streaming.confirms import FRAME_HEADER, AmqpFrame, FrameReader

RABBITMQ = ("127.0.0.1", 5672)
T = TypeVar("T")


def raw(frame: AmqpFrame) -> bytes:
    return FRAME_HEADER.pack(frame.kind, frame.channel, len(frame.payload)) + frame.payload + b"\xce"


class AmqpProxy:
    """Runs on its own event loop in a thread; its methods may be called from the test's thread."""

    def __init__(self, close_after: float | None = None) -> None:
        self.close_after = close_after
        self.accepted = 0
        self.client_frames: list[AmqpFrame] = []  # what clients sent, after the protocol header
        self.server_frames: list[AmqpFrame] = []  # what RabbitMQ sent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="amqp-proxy", daemon=True)
        self.thread.start()
        self.clients: list[asyncio.StreamWriter] = []
        self.both_ways, self.upstream = self.call(self.make_gates())
        self.server = self.call(asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def make_gates(self) -> tuple[asyncio.Event, asyncio.Event]:
        both_ways, upstream = asyncio.Event(), asyncio.Event()
        both_ways.set()
        upstream.set()
        return both_ways, upstream

    def url(self, rabbit_url: str) -> str:
        """`rabbit_url` (the test vhost), through the proxy."""
        parts = urlsplit(rabbit_url)
        return urlunsplit((parts.scheme, f"guest:guest@127.0.0.1:{self.port}", parts.path, "", ""))

    def freeze(self) -> None:
        """Forward nothing either way (connections stay open): a stalled broker."""
        self.loop.call_soon_threadsafe(self.both_ways.clear)

    def thaw(self) -> None:
        self.loop.call_soon_threadsafe(self.both_ways.set)

    def hold_upstream(self) -> None:
        """Stop reading what clients send (TCP fills up on their side); RabbitMQ's frames still flow."""
        self.loop.call_soon_threadsafe(self.upstream.clear)

    def release_upstream(self) -> None:
        self.loop.call_soon_threadsafe(self.upstream.set)

    def inject(self, frame: bytes) -> None:
        """Send `frame` to every client as if RabbitMQ had sent it (between two of RabbitMQ's frames)."""

        def write() -> None:
            for writer in self.clients:
                writer.write(frame)

        self.loop.call_soon_threadsafe(write)

    def sent_by_client(self, class_id: int, method_id: int) -> int:
        """How many method frames of this kind clients sent."""
        prefix = class_id.to_bytes(2, "big") + method_id.to_bytes(2, "big")
        return sum(1 for f in list(self.client_frames) if f.kind == 1 and f.payload[:4] == prefix)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        server_reader, server_writer = await asyncio.open_connection(*RABBITMQ)
        self.clients.append(client_writer)
        upstream = self.pump(client_reader, server_writer, self.client_frames, (self.both_ways, self.upstream), 8)
        downstream = self.pump(server_reader, client_writer, self.server_frames, (self.both_ways,), 0)
        pumps = {asyncio.create_task(upstream), asyncio.create_task(downstream)}
        if self.close_after is not None:
            pumps.add(asyncio.create_task(asyncio.sleep(self.close_after)))
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        self.clients.remove(client_writer)
        for writer in (client_writer, server_writer):
            writer.transport.abort()

    async def pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: list[AmqpFrame],
        gates: tuple[asyncio.Event, ...],
        header: int,
    ) -> None:
        """Forward whole frames only, so an injected frame never lands inside one of them."""
        if header:
            writer.write(await reader.readexactly(header))
        frames = FrameReader()
        while True:
            for gate in gates:
                await gate.wait()
            data = await reader.read(1 << 20)
            if not data:
                return
            for frame in frames.feed(data):
                record.append(frame)
                writer.write(raw(frame))
            await writer.drain()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for writer in list(self.clients):
                writer.transport.abort()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
