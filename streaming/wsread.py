"""A websockets client connection that hands Bybit's frames straight to the gateway.

websockets parses every frame with generators (`Frame.parse` yielding from a stream reader),
queues it in an assembler and wakes a `recv()` coroutine for it: measured on (b)'s feed, 2.6 us
a frame to parse and 4.4 us to a `recv()` return, where the frame itself is a 2-10 byte header
before ~200 bytes of text. `DirectConnection` reads the frames Bybit sends, final unmasked data
frames of known length, itself, and calls `deliver(message)` from `data_received`: no queue, no
future, no coroutine per frame. Text arrives as `str`; a binary frame, or a text frame that is
not UTF-8 (websockets fails the connection: 1007), as `bytes`, which the gateway counts as malformed.

Everything else is websockets' own: the handshake, and every frame that is not such a data frame
(ping, pong, close, fragments, reserved bits, a mask, over `max_size`) is fed to websockets'
protocol whole, at a frame boundary, exactly as it would have received it. A control frame is
answered there (a ping's pong, the closing handshake) and direct reading goes on; after any other
frame websockets handles, or once the connection is closing, the rest of the stream is
websockets' and `read_all` goes on with `recv()` (`handed_back`), so no frame changes order.
Every BATCH frames, and whenever the gateway's hand-off is nearly full (`hold`), reading stops
(the socket paused) until the loop's next turn or the hand-off's relief.
tests/test_wsread.py checks what it delivers against websockets' own client on the same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

FIN_TEXT = 0x81  # FIN set, no reserved bits, opcode 1 (text)
FIN_BINARY = 0x82
DATA_HEADS = frozenset((FIN_TEXT, FIN_BINARY))
CONTROL_OPCODES = frozenset((0x8, 0x9, 0xA))  # close, ping, pong
BATCH = 32  # frames delivered before the loop gets a turn (other sockets, the publisher, RabbitMQ's acks)

Deliver = Callable[[str | bytes], None]
# Called after each frame; True when the reader must wait (the hand-off is nearly full).
Hold = Callable[[], bool]
Relieve = Callable[[], Any]  # awaited while the reader holds, as BybitSocket.read awaits it


class DirectConnection(ClientConnection):
    """websockets' client connection, reading its data frames itself once `read_directly` is called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deliver: Deliver | None = None
        self.hold: Hold | None = None
        self.relieve: Relieve | None = None
        self.direct = False
        self.buffer = b""  # bytes received, delivered up to `offset`: the rest is a frame's start, or held
        self.offset = 0
        self.stopped = False  # reading paused until the loop's next turn or the hand-off's relief
        self.paused_reading = False
        self.lost = False  # the connection is gone: what the buffer holds is still delivered
        self.failure: BaseException | None = None
        self.handed_back: asyncio.Future[None] = self.loop.create_future()
        self.max_payload = self.protocol.max_message_size

    async def read_all(self, deliver: Deliver, hold: Hold | None = None, relieve: Relieve | None = None) -> None:
        """Deliver every frame, directly or else from recv(), until the connection ends: then raise its close."""
        if self.read_directly(deliver, hold, relieve):
            try:
                await self.handed_back  # the connection ended, or websockets has the rest of the stream
            finally:
                self.stop_reading()
            if self.failure is not None:
                raise self.failure
        count = 0  # websockets' queue: what it was handed back, or the connection's end
        while True:
            deliver(await self.recv())  # recv() returns without yielding while frames are buffered
            if hold is not None and relieve is not None and hold():
                await relieve()
            count += 1
            if count % BATCH == 0:
                await asyncio.sleep(0)  # let the publisher and RabbitMQ's acks have their turn

    def read_directly(self, deliver: Deliver, hold: Hold | None = None, relieve: Relieve | None = None) -> bool:
        """Deliver frames from now on; False (websockets keeps them, read with `recv()`) when it holds some already."""
        if self.protocol.state is not State.OPEN or len(self.recv_messages.frames) or self.protocol.reader.buffer:
            return False
        self.deliver, self.hold, self.relieve, self.direct = deliver, hold, relieve, True
        return True

    def data_received(self, data: bytes) -> None:
        if not self.direct:
            super().data_received(data)
            return
        if self.offset < len(self.buffer):
            self.buffer = self.buffer[self.offset :] + data
        else:
            self.buffer = data
        self.offset = 0
        if not self.stopped:
            self.deliver_buffered()

    def deliver_buffered(self) -> None:
        """Deliver the buffer's complete frames, BATCH at a time; give websockets what it must see."""
        buffer, deliver, hold, limit = self.buffer, self.deliver, self.hold, self.max_payload
        assert deliver is not None
        size, pos, count = len(buffer), self.offset, 0
        try:
            while size - pos >= 2:
                first, second = buffer[pos], buffer[pos + 1]
                length, head = second & 0x7F, 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
                end = pos + head + length
                if first not in DATA_HEADS or second & 0x80 or (limit is not None and length > limit):
                    if self.lost:  # held frames after the loss: data frames are delivered, nothing is answered
                        if size < end:
                            break
                        pos = end
                        continue
                    control = first & 0x0F in CONTROL_OPCODES and first & 0xF0 == 0x80
                    if not control or second & 0x80 or length > 125:
                        return self.hand_back(buffer[pos:])  # a data frame, or one websockets must refuse
                    if size < end:
                        break
                    super().data_received(buffer[pos:end])  # a ping's pong, a close's reply: websockets'
                    pos = end
                    if self.protocol.state is not State.OPEN:
                        return self.hand_back(buffer[pos:])
                    continue
                if size < end:
                    break
                payload = buffer[pos + head : end]
                if first == FIN_TEXT:
                    try:
                        message: str | bytes = payload.decode()
                    except UnicodeDecodeError:
                        message = payload  # the gateway counts it malformed; websockets would close with 1007
                else:
                    message = payload
                pos = end
                deliver(message)
                count += 1
                if hold is not None and hold():
                    self.hold_at(pos, self.relieve)
                    return None
                if count == BATCH:
                    self.hold_at(pos, None)
                    return None
        except Exception as exc:  # noqa: BLE001 - the gateway's own failure: the reader raises it, as recv()'s loop did
            self.failure = exc
            self.direct, self.buffer, self.offset = False, b"", 0
            self.transport.abort()
            self.done()
            return None
        self.offset = pos  # every complete frame delivered: the socket is read again
        if self.paused_reading and not self.lost:
            self.paused_reading = False
            self.transport.resume_reading()
        if self.lost:
            self.done()
        return None

    def hold_at(self, pos: int, relieve: Relieve | None) -> None:
        """Stop at `pos` of the buffer, socket reads paused; go on at the loop's next turn, or once relieved."""
        self.offset, self.stopped = pos, True
        if not self.paused_reading and not self.lost:
            self.paused_reading = True
            self.transport.pause_reading()
        if relieve is None:
            self.loop.call_soon(self.go_on)
        else:
            task = self.loop.create_task(relieve())
            task.add_done_callback(lambda _: self.go_on())

    def go_on(self) -> None:
        if self.stopped and self.direct:
            self.stopped = False
            self.deliver_buffered()

    def hand_back(self, rest: bytes) -> None:
        """From here on the stream is websockets': its queue and `recv()`."""
        self.stop_reading()
        if rest and not self.lost:
            super().data_received(rest)
        self.done()

    def stop_reading(self) -> None:
        """Frames from now on are websockets' (and, once the reader is gone, nobody's, as after a `recv()` loop)."""
        self.direct, self.buffer, self.offset = False, b"", 0
        if self.paused_reading and not self.lost:
            self.paused_reading = False
            self.transport.resume_reading()

    def done(self) -> None:
        if not self.handed_back.done():
            self.handed_back.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        """Frames received before the loss are delivered first; `recv()` then raises the close."""
        self.lost = True
        super().connection_lost(exc)
        if not self.direct:
            self.done()
        elif not self.stopped:
            self.deliver_buffered()
