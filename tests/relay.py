"""A TCP relay a test can partition: one process's way to Redis, cut without touching anyone else's."""

from __future__ import annotations

import socket
import threading


class TcpRelay:
    """Relays 127.0.0.1:<port> to `target`; `partition()` keeps every connection open and passes nothing.

    A partition, not a refusal: the client's commands go out and no answer comes back, as when
    a network path dies. Only clients pointed at `url` are affected.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.passing = threading.Event()
        self.passing.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, name="relay-accept", daemon=True).start()

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def partition(self) -> None:
        self.passing.clear()

    def accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(source, sink), name="relay-pump", daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.passing.wait()
                if self.closed:
                    return
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        except OSError:
            pass
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        self.passing.set()
