"""amqps:// works end to end: publisher, declarations, nudges and consumers over TLS to a throwaway CA.

The local RabbitMQ gets a TLS listener on a free port for this session (`rabbitmqctl eval`
starts it at runtime, no restart or config file needed), with a CA and a server certificate
made here by the openssl command line tool.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import uvloop

from streaming.publisher import connect
from subscriptions.models import Subscription
from subscriptions.services import subscription_create
from tests.conftest import QueueReader, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass(frozen=True)
class TlsListener:
    port: int
    ca_file: str
    directory: str


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: str) -> None:
    """A CA, and a certificate for localhost and 127.0.0.1 signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ws-gateway test CA", cwd=directory)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=directory)  # fmt: skip
    Path(directory, "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=directory)  # fmt: skip
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o644)  # RabbitMQ runs as its own user


def rabbitmqctl_eval(expression: str) -> str:
    result = subprocess.run(["rabbitmqctl", "eval", expression], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl eval failed: {result.stdout} {result.stderr}")
    return result.stdout.strip()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def tls_listener() -> Iterator[TlsListener]:
    """A TLS listener on the local RabbitMQ for this session, with its CA file; stopped afterwards."""
    for tool in ("openssl", "rabbitmqctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the TLS tests need the local RabbitMQ and openssl")
    directory = tempfile.mkdtemp(prefix="wsgateway-tls-")
    os.chmod(directory, 0o755)
    make_certificates(directory)
    port = free_port()
    listener = f'{{"127.0.0.1", {port}}}'
    options = (
        f'[{{cacertfile, "{directory}/ca.pem"}}, {{certfile, "{directory}/server.pem"}}, '
        f'{{keyfile, "{directory}/server.key"}}, {{verify, verify_none}}, {{fail_if_no_peer_cert, false}}]'
    )
    rabbitmqctl_eval(f"rabbit_networking:ensure_ssl(), rabbit_networking:start_ssl_listener({listener}, {options}, 1).")
    yield TlsListener(port, f"{directory}/ca.pem", directory)
    rabbitmqctl_eval(f"rabbit_networking:stop_tcp_listener({listener}).")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def amqps(rabbit: str, tls_listener: TlsListener, settings) -> str:
    """The test vhost's URL over TLS (host name checked against the certificate), set for the whole project."""
    parts = urlsplit(rabbit)
    url = urlunsplit(("amqps", f"guest:guest@localhost:{tls_listener.port}", parts.path, "", ""))
    settings.RABBITMQ_URL = url
    settings.RABBITMQ_TLS_CA_FILE = tls_listener.ca_file
    settings.RABBITMQ_TLS_VERIFY = True
    settings.CELERY_BROKER_USE_SSL = {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": tls_listener.ca_file}
    return url


class LoopGatewayThread:
    """A real Gateway in its own thread, on the event loop `run` makes (asyncio.run or uvloop.run)."""

    def __init__(self, run: Callable) -> None:
        from streaming.gateway import Gateway, GatewayConfig

        self.gateway = Gateway(GatewayConfig.from_settings())
        self.result: int | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", run(self.gateway.run())))
        self.thread.start()
        wait_for(lambda: self.gateway.state == "running", message="the gateway to start")

    def stop(self) -> int | None:
        loop = self.gateway.loop
        if loop is not None and self.thread.is_alive():
            loop.call_soon_threadsafe(self.gateway.stop_event.set)
        self.thread.join(15)
        return self.result


def status_of(subscription: Subscription) -> str:
    subscription.refresh_from_db()
    return subscription.status


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_gateway_delivers_orders_and_trades_over_tls(run, gateway_settings, amqps, simulator) -> None:
    """Everything the gateway says to RabbitMQ goes over TLS, and a TLS consumer reads it."""
    runner = LoopGatewayThread(run)
    try:
        order, _ = subscription_create(service_name="alpha", channel="order")
        trades, _ = subscription_create(service_name="alpha", channel="trades", category="linear", symbol="BTCUSDT")
        wait_for(lambda: status_of(order) == "active" and status_of(trades) == "active", message="both active")
        wait_for(lambda: runner.gateway.publisher.connected, message="the publisher connected over TLS")
        orders = QueueReader(amqps, "ws-gateway.alpha.order")
        sent = [simulator.call(simulator.sim.emit_order(symbol="SOLUSDT", orderStatus="New")) for _ in range(3)]
        orders.wait(lambda m: len(m) >= 3, message="three orders over TLS")
        assert [m["data"] for m in orders.messages] == [s["data"][0] for s in sent]
        reader = QueueReader(amqps, "ws-gateway.alpha.trade")
        reader.wait(lambda m: len(m) >= 3, message="trades over TLS")
        orders.close()
        reader.close()
        assert runner.gateway.publisher.last_error == ""
    finally:
        assert runner.stop() == 0


def test_py_amqp_connections_check_the_certificate(amqps, tls_listener, settings) -> None:
    """Declarations, nudges and consumers (py-amqp) verify the broker against RABBITMQ_TLS_CA_FILE."""
    conn = connect(amqps)
    assert conn.transport.sock.version().startswith("TLS")
    conn.close()
    settings.RABBITMQ_TLS_CA_FILE = ""  # the system CAs do not know the throwaway CA
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(amqps)
    settings.RABBITMQ_TLS_VERIFY = False
    connect(amqps).close()
