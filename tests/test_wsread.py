"""DirectConnection (streaming.wsread) against websockets' own client, on the same bytes from a real server.

The server writes a script of frames serialised by websockets (`Frame.serialize`) as raw bytes, cut
at random places, to two clients: websockets' plain `ClientConnection` read with `recv()`, and a
`DirectConnection` reading directly, then with `recv()` once it hands the stream back. Both must
end with the same messages in the same order, and the same close.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from streaming.wsread import DirectConnection

MAX_SIZE = 2**17


def text(payload: str | bytes) -> Frame:
    return Frame(Opcode.TEXT, payload.encode() if isinstance(payload, str) else payload)


PLAIN = [text(""), text("a"), text("x" * 125), text("y" * 126), text("z" * 127), text("é" * 40_000),
         text('{"topic":"orderbook.50.BTCUSDT","type":"delta","data":{"b":[["1","2"]]}}'),
         *(text(f"frame {i}" * (i % 40)) for i in range(300))]  # fmt: skip
PING = Frame(Opcode.PING, b"are you there")
BINARY = Frame(Opcode.BINARY, b"\x00\x01\x02")
FRAGMENTS = [Frame(Opcode.TEXT, b"first half, ", fin=False), Frame(Opcode.CONT, b"second half")]


async def serve_script(script: list[Frame | str], seed: int, ready: asyncio.Event) -> tuple[int, list[bool]]:
    """A server writing `script` (frames, or "ping" for a ping websockets' server side awaits) once a client says go."""
    pongs: list[bool] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # "go": the client reads directly from here on
        rng = random.Random(seed)
        wire = b""
        for item in script:
            if item == "ping":
                ws.transport.write(wire)
                wire = b""
                waiter = await ws.ping(b"ours")
                try:
                    await asyncio.wait_for(waiter, 5)
                    pongs.append(True)
                except TimeoutError:
                    pongs.append(False)
                continue
            wire += item.serialize(mask=False, extensions=[])
        while wire:  # cut at random places: frame heads and payloads split across reads
            cut = rng.randint(1, 3000)
            ws.transport.write(wire[:cut])
            wire = wire[cut:]
            await asyncio.sleep(0)
        await ws.close()

    server = await serve(handler, "127.0.0.1", 0, compression=None, max_size=None)
    ready.set()
    return server, pongs


async def messages_of(client: ClientConnection) -> tuple[list[str | bytes], int, int | None]:
    """(messages, how many were delivered directly, close code) of one client until the server closes."""
    received: list[str | bytes] = []
    direct = 0
    if isinstance(client, DirectConnection):
        assert client.read_directly(received.append)
        await client.send("go")
        await asyncio.wait_for(client.handed_back, 10)
        client.stop_reading()
        direct = len(received)
    else:
        await client.send("go")
    try:
        while True:
            received.append(await asyncio.wait_for(client.recv(), 10))
    except ConnectionClosed as closed:
        code = closed.sent.code if closed.sent else None  # the client's close: 1000 echoed, or its refusal
    return received, direct, code


CLIENTS = {"websockets": ClientConnection, "direct": DirectConnection}


def run_both(script: list[Frame | str], seed: int = 1, clients: tuple[str, ...] = tuple(CLIENTS)) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        ready = asyncio.Event()
        server, pongs = await serve_script(script, seed, ready)
        port = server.sockets[0].getsockname()[1]
        results = {}
        try:
            for name in clients:
                factory = CLIENTS[name]
                async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=MAX_SIZE,
                                   ping_interval=None, create_connection=factory) as client:  # fmt: skip
                    results[name] = await messages_of(client)
        finally:
            server.close()
            await server.wait_closed()
        results["pongs"] = pongs  # type: ignore[assignment]
        return results

    return asyncio.run(main())


def same(results: dict) -> bool:
    """Both clients received the same messages, in the same order, and closed with the same code."""
    (ours, _, our_code), (theirs, _, their_code) = results["direct"], results["websockets"]
    return ours == theirs and our_code == their_code


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_text_frames_are_delivered_as_websockets_would_receive_them(seed):
    results = run_both(PLAIN, seed)

    assert same(results)
    received, direct, code = results["direct"]
    assert len(received) == len(PLAIN) and direct == len(PLAIN)  # every one read directly
    assert code == 1000


def test_a_ping_is_answered_and_direct_reading_goes_on():
    results = run_both([*PLAIN[:50], "ping", *PLAIN[50:]])

    assert same(results)
    assert results["pongs"] == [True, True]  # websockets' client and the direct one both answered
    assert results["direct"][1] == len(PLAIN)


def test_binary_frames_are_delivered_as_bytes_and_reading_stays_direct():
    script = [*PLAIN[:20], BINARY, *PLAIN[20:]]

    results = run_both(script)

    assert same(results)
    received, direct, _ = results["direct"]
    assert direct == len(script) and received[20] == BINARY.data


def test_a_fragmented_message_hands_the_stream_back_in_order():
    script = [*PLAIN[:20], *FRAGMENTS, *PLAIN[20:]]

    results = run_both(script)

    assert same(results)
    received, direct, _ = results["direct"]
    assert direct == 20  # up to the fragments; websockets read the rest with recv()
    assert received[20] == "first half, second half" and len(received) == len(PLAIN) + 1


def test_a_frame_over_max_size_fails_the_connection_as_websockets_does():
    results = run_both([*PLAIN[:30], text("x" * (MAX_SIZE + 1)), *PLAIN[30:]])

    assert same(results)
    assert results["direct"][0] == [frame.data.decode() for frame in PLAIN[:30]]
    assert results["direct"][2] == 1009  # message too big, as websockets' own client closes it


def test_a_text_frame_that_is_not_utf8_is_delivered_as_bytes_and_reading_goes_on():
    """websockets fails the connection for it (1007); the gateway counts it malformed and reads on."""
    bad = text("é".encode()[:1])

    results = run_both([*PLAIN[:30], bad, *PLAIN[30:]], clients=("direct",))

    received, direct, code = results["direct"]
    assert received == [*(frame.data.decode() for frame in PLAIN[:30]), bad.data,
                        *(frame.data.decode() for frame in PLAIN[30:])]  # fmt: skip
    assert direct == len(PLAIN) + 1 and code == 1000


def test_a_held_reader_loses_nothing_and_keeps_the_order():
    """The hand-off is full twice: reading pauses until relieved, then goes on where it stopped."""

    async def main() -> tuple[list[str], int]:
        ready = asyncio.Event()
        server, _ = await serve_script(PLAIN, 7, ready)
        port = server.sockets[0].getsockname()[1]
        received: list[str] = []
        reliefs = 0

        def hold() -> bool:
            return len(received) in (10, 200)

        async def relieve() -> None:
            nonlocal reliefs
            reliefs += 1
            await asyncio.sleep(0.05)

        try:
            async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=MAX_SIZE, ping_interval=None,
                               create_connection=DirectConnection) as client:  # fmt: skip
                assert client.read_directly(received.append, hold, relieve)
                await client.send("go")
                await asyncio.wait_for(client.handed_back, 10)
        finally:
            server.close()
            await server.wait_closed()
        return received, reliefs

    received, reliefs = asyncio.run(main())

    assert received == [frame.data.decode() for frame in PLAIN]
    assert reliefs == 2


def test_a_failure_of_the_reader_ends_the_connection_and_is_kept_for_it():
    async def main() -> tuple[BaseException | None, list[str]]:
        ready = asyncio.Event()
        server, _ = await serve_script(PLAIN, 1, ready)
        port = server.sockets[0].getsockname()[1]
        received: list[str] = []

        def deliver(message: str) -> None:
            if len(received) == 5:
                raise RuntimeError("the gateway's own bug")
            received.append(message)

        try:
            async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None,
                               create_connection=DirectConnection) as client:  # fmt: skip
                client.read_directly(deliver)
                await client.send("go")
                await asyncio.wait_for(client.handed_back, 10)
                return client.failure, received
        finally:
            server.close()
            await server.wait_closed()

    failure, received = asyncio.run(main())

    assert isinstance(failure, RuntimeError) and len(received) == 5


def test_frames_held_when_the_connection_is_aborted_are_still_delivered():
    """The reader waits for the hand-off when the socket is given up (a dead socket's abort): what was read is kept."""

    async def main() -> tuple[list[str | bytes], int]:
        received: list[str | bytes] = []
        gone = asyncio.Event()

        async def handler(ws: ServerConnection) -> None:
            await ws.recv()
            ws.transport.write(b"".join(frame.serialize(mask=False, extensions=[]) for frame in PLAIN))
            await ws.wait_closed()

        async def relieve() -> None:
            await gone.wait()  # the hand-off frees up only after the connection is gone

        server = await serve(handler, "127.0.0.1", 0, compression=None)
        port = server.sockets[0].getsockname()[1]
        try:
            async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=MAX_SIZE, ping_interval=None,
                               create_connection=DirectConnection) as client:  # fmt: skip
                assert client.read_directly(received.append, lambda: len(received) == 3, relieve)
                await client.send("go")
                while len(received) < 3:
                    await asyncio.sleep(0.01)
                client.transport.abort()
                await asyncio.wait_for(client.wait_closed(), 10)
                held = len(received)
                gone.set()
                await asyncio.wait_for(client.handed_back, 10)
                with pytest.raises(ConnectionClosed):
                    await client.recv()
        finally:
            server.close()
            await server.wait_closed()
        return received, held

    received, held = asyncio.run(main())

    assert held == 3
    assert len(received) >= 5  # the tiny frames after the third came in the same read
    assert received == [frame.data.decode() for frame in PLAIN][: len(received)]


def test_read_all_goes_on_with_recv_after_a_hand_back_and_raises_the_close():
    """BybitSocket's reader: directly, then (after fragments) from websockets' queue, until the connection ends."""

    async def main() -> tuple[list[str | bytes], BaseException | None]:
        ready = asyncio.Event()
        server, _ = await serve_script([*PLAIN[:20], *FRAGMENTS, *PLAIN[20:]], 5, ready)
        port = server.sockets[0].getsockname()[1]
        received: list[str | bytes] = []
        ended: BaseException | None = None
        try:
            async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=MAX_SIZE, ping_interval=None,
                               create_connection=DirectConnection) as client:  # fmt: skip
                reading = asyncio.ensure_future(client.read_all(received.append))
                await client.send("go")
                try:
                    await asyncio.wait_for(reading, 10)
                except ConnectionClosed as closed:
                    ended = closed
        finally:
            server.close()
            await server.wait_closed()
        return received, ended

    received, ended = asyncio.run(main())

    texts = [frame.data.decode() for frame in PLAIN]
    assert received == [*texts[:20], "first half, second half", *texts[20:]]
    assert isinstance(ended, ConnectionClosed)
