"""Every command README.md and the `make demo` banner print, run as printed against a live `manage.py demo`.

The demo runs as `make demo` runs it (simulator, gateway, gunicorn, Celery worker and beat, the
consumer), on free ports, this session's database, RabbitMQ vhost and Redis prefix. Commands are
taken from the files, not copied here: a new command in the README must run, or be listed in
SKIPPED with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from streaming.management.commands.demo import DEMO_SUBSCRIPTIONS
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMAND_STARTS = ("curl ", "python ", ".venv/bin/", "celery ", "make ", "docker ")

# Commands not run here, by the start of the command, each with the reason.
SKIPPED = {
    "make demo": "runs `manage.py demo` after make venv/services/.env; the fixture runs that demo",
    "make test": "the test suite itself",
    "make bench": "benchmarks, minutes long",
    "make bench-sim": "benchmarks, minutes long",
    "make lint": "checks style, not behaviour",
    "make migrate": "migrates the developer's own database (the demo migrates the test one)",
    "make .env": "tests/test_first_run.py runs it in a copy of the project",
    "docker compose": "Docker cannot run here; tests/test_compose.py reads docker-compose.yml",
    "python manage.py run_gateway": "the demo runs it; a second one would only wait as standby",
}
# Commands that run until Ctrl-C: what is added to end them.
BOUNDED = {"python manage.py tail_events": " --count 1 --timeout 30"}
# Servers: started with these arguments (free ports), checked to answer, stopped.
SERVERS = {
    "python manage.py bybit_simulator": " --port {port} --control-port {port2}",
    "celery -A wsgateway flower": " --port={port} --address=127.0.0.1",
}
# Commands whose output must show something, not only succeed (what the tour promises).
EXPECTED: dict[str, Callable[[str], bool]] = {
    "/balances?": lambda out: json.loads(out)["count"] >= 1,
    "/account/orders?": lambda out: json.loads(out)["count"] >= 1,  # the order the line before placed
    "/subscriptions?status=active": lambda out: json.loads(out)["count"] >= 1,
    "market/orderbook/": lambda out: bool(json.loads(out)["b"]),
}
# curl answers an HTTP error with a failing exit status (and still prints the body).
PRELUDE = 'set -o pipefail; curl() { command curl --fail-with-body --show-error --max-time 30 "$@"; }\n'


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    web: int
    sim: int
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def banner(self) -> list[str]:
        text = self.output
        return text[text.index("ws-gateway demo") : text.index("Ctrl-C stops everything.")].splitlines()

    def key(self) -> str:
        return re.search(r"service key for 'demo':\s+(\S+)", self.output).group(1)


def free_port(pair: bool = False) -> int:
    """A free TCP port (and, with `pair`, the one after it free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    password = f":{s['PASSWORD']}" if s["PASSWORD"] else ""
    return f"postgres://{s['USER']}{password}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def stop(proc: subprocess.Popen[str], children: list[int]) -> None:
    """Ctrl-C, as a user stops the demo; the processes it started are killed if it does not finish."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid in children:  # honcho gives each process its own group
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def demo(transactional_db, rabbit: str, redis_prefix: str) -> Iterator[Demo]:
    web, sim = free_port(), free_port(pair=True)
    env = {
        **os.environ,
        "DJANGO_DEBUG": "true",  # as the Makefile runs it
        "DATABASE_URL": database_url(),
        "RABBITMQ_URL": rabbit,
        "REDIS_KEY_PREFIX": redis_prefix,
        "WS_GATEWAY_PORT": str(web),
        "SIMULATOR_PORT": str(sim),
        "MONITOR_INTERVAL": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    demo = Demo(proc, web, sim, env)
    reader = threading.Thread(target=lambda: demo.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: "Ctrl-C stops everything." in demo.output or proc.poll() is not None, 60, message="banner")
        assert proc.poll() is None, demo.output
        api = f"http://127.0.0.1:{web}/api/v1/subscriptions?status=active"
        wait_for(
            lambda: live_count(api, demo.key()) == len(DEMO_SUBSCRIPTIONS),
            60,
            interval=0.5,
            message="every demo subscription live",
        )
        yield demo
    finally:
        stop(proc, [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", demo.output)])


def live_count(url: str, key: str) -> int:
    try:
        return requests.get(url, headers={"X-API-Key": key}, timeout=5).json()["count"]
    except (requests.RequestException, ValueError, KeyError):
        return -1


def readme_commands() -> list[tuple[str, str]]:
    """("sh" or "python", text) for every command in README.md, in the order a reader meets them."""
    text = (ROOT / "README.md").read_text()
    commands: list[tuple[int, str, str]] = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        language, body = match.group(1), match.group(2)
        if language == "python":
            commands.append((match.start(), "python", body))
        elif language == "sh":
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    commands.append((match.start(), "sh", line.strip()))
    prose = re.sub(r"^```.*?^```", lambda m: " " * len(m.group(0)), text, flags=re.MULTILINE | re.DOTALL)
    for match in re.finditer(r"`([^`\n]+)`", prose):
        span = match.group(1)
        if span.startswith(COMMAND_STARTS) and " " in span:
            commands.append((match.start(), "sh", span))
    commands.sort(key=lambda c: c[0])
    seen: set[str] = set()
    return [(kind, c) for _, kind, c in commands if not (c in seen or seen.add(c))]


def banner_commands(banner: list[str]) -> list[str]:
    """The commands the banner prints, and a curl of every URL it names."""
    commands = []
    for line in banner:
        command = re.search(r"(curl .+|\S*python\S* manage\.py .+)$", line)
        if command:
            commands.append(command.group(1))
        elif "http://" in line:
            commands += [
                f"curl -s -o /dev/null -H 'X-API-Key: {{KEY}}' {url}" for url in re.findall(r"http://[^\s)]+", line)
            ]
    return commands


def plain(command: str) -> str:
    """The command as matched against SKIPPED/BOUNDED/SERVERS: the virtualenv's prefix dropped."""
    return re.sub(r"^\S*/(?=(python|celery) )", "", command)


class Runner:
    """Runs commands in a shell with the demo's ports and keys, keeping the tour's variables."""

    def __init__(self, demo: Demo, cwd: Path) -> None:
        self.demo, self.cwd = demo, cwd
        self.variables: list[str] = []
        self.first_id = ""
        self.ran: list[str] = []

    def localise(self, text: str) -> str:
        demo = self.demo
        for old, new in (
            ("127.0.0.1:4400", f"127.0.0.1:{demo.web}"),
            ("127.0.0.1:8765", f"127.0.0.1:{demo.sim}"),
            ("127.0.0.1:8766", f"127.0.0.1:{demo.sim + 1}"),
            ("<the demo service key>", demo.key()),
            ("{KEY}", demo.key()),
            ("<id>", self.first_id),
            ("<service>", "readme-service"),
        ):
            text = text.replace(old, new)
        text = re.sub(r"^(?:\S*/)?(python|celery) ", lambda m: f"{BIN / m.group(1)} ", text)
        return text.replace(" manage.py ", f" {ROOT / 'manage.py'} ")

    def run(self, kind: str, command: str) -> None:
        if kind == "python":
            self.check(subprocess.run([sys.executable, "-c", self.localise(command)], **self.options()), command)
            return
        name = plain(command)
        if any(name.startswith(prefix) for prefix in SKIPPED):
            return
        if re.match(r"^[A-Z]+=", command):
            self.variables.append(self.localise(command))
            return
        server = next((args for prefix, args in SERVERS.items() if name.startswith(prefix)), None)
        if server is not None:
            self.serve(command, server)
            return
        extra = next((extra for p, extra in BOUNDED.items() if name.startswith(p)), "")
        line = re.sub(r"(\s+#.*)?$", lambda m: extra + (m.group(1) or ""), self.localise(command), count=1)
        expected = next((check for marker, check in EXPECTED.items() if marker in command), None)
        deadline = time.monotonic() + 20
        while True:
            result = subprocess.run(["bash", "-c", PRELUDE + "\n".join([*self.variables, line])], **self.options())
            if expected is None or result.returncode != 0 or expected(result.stdout) or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the gateway writes what the previous command asked for within moments
        self.check(result, command)
        assert expected is None or expected(result.stdout), (command, result.stdout[:500])
        if not self.first_id and '"id"' in result.stdout and "-X POST $API/subscriptions" in command:
            self.first_id = json.loads(result.stdout)["id"]

    def serve(self, command: str, arguments: str) -> None:
        port = free_port(pair=True)
        line = self.localise(command) + arguments.format(port=port, port2=port + 1)
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.cwd,
            env=self.demo.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: port_open(port) or proc.poll() is not None, 30, message=f"{command} to listen")
            assert proc.poll() is None, f"{command} exited with {proc.returncode}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()  # Flower can sit out a SIGTERM while it talks to the broker
                proc.wait()
        self.ran.append(command)

    def check(self, result: subprocess.CompletedProcess[str], command: str) -> None:
        assert result.returncode == 0, (command, result.stdout[-1000:], result.stderr[-2000:])
        self.ran.append(command)

    def options(self) -> dict:
        return {"cwd": self.cwd, "env": self.demo.env, "text": True, "timeout": 60, "capture_output": True}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_every_readme_and_banner_command_works_as_printed(demo: Demo, tmp_path: Path) -> None:
    runner = Runner(demo, tmp_path)
    banner = banner_commands(demo.banner())
    assert any("control/orders" in c for c in banner) and any("tail_events" in c for c in banner)
    for command in banner:
        runner.run("sh", command)

    # What the banner promises: the consumer prints trades and the order update, and acks it all.
    wait_for(lambda: re.search(r"consumer\s+\| \S+ trade\.linear\.BTCUSDT ", demo.output), 20, message="a trade")
    wait_for(lambda: "ws-gateway.demo.order snapshot" in demo.output, 20, message="the order update printed")
    queues_url = f"http://127.0.0.1:{demo.web}/api/v1/queues"
    wait_for(lambda: healthy(queues_url, demo.key()), 30, interval=0.5, message="every demo queue ok and consumed")

    commands = readme_commands()
    assert ("sh", 'curl -s -X DELETE $API/subscriptions/by-service/demo -H "X-API-Key: $KEY"') in commands
    for kind, command in commands:
        runner.run(kind, command)
    assert runner.first_id, "the tour's first subscription"
    assert len(runner.ran) >= 25, runner.ran


def healthy(url: str, key: str) -> bool:
    rows = requests.get(url, headers={"X-API-Key": key}, timeout=5).json()["results"]
    demo_rows = [r for r in rows if r["queue"].startswith("ws-gateway.demo.")]
    return len(demo_rows) == len(DEMO_SUBSCRIPTIONS) and all(
        r["status"] == "ok" and r["consumers"] >= 1 for r in demo_rows
    )


def test_readme_commands_are_found_and_each_skip_is_real() -> None:
    commands = [c for kind, c in readme_commands() if kind == "sh"]
    for prefix in SKIPPED:
        assert any(plain(c).startswith(prefix) for c in commands), (
            f"SKIPPED lists {prefix!r}, which README.md no longer prints"
        )
    assert any(c.startswith("python manage.py create_api_key") for c in commands)
    assert not any(c.startswith(("KEY", "API")) and "#" in c.split("=", 1)[0] for c in commands)
