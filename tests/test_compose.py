"""docker-compose.yml as `docker compose` reads it (no Docker here): a first run has an exchange and a secret."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("release", "web", "gateway", "worker", "beat", "flower", "simulator")
# `${NAME...}` is interpolated by compose from the shell or .env; `$${NAME}` reaches the container's shell.
INTERPOLATED = re.compile(r"(?<!\$)\$\{(\w+)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def documented_variables() -> set[str]:
    names = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]+)=", line)
        if match:
            names.add(match.group(1))
    return names


def test_every_procfile_process_and_the_simulator_is_a_service(compose: dict[str, Any]) -> None:
    procfile = [line.split(":", 1)[0] for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()]
    assert set(procfile) | {"simulator"} <= set(compose["services"])


def test_every_service_dependency_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}) or {}:
            assert dependency in services, (name, dependency)


def test_gateway_trades_against_the_simulator_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway_env = services["gateway"]["environment"]
    assert gateway_env["SIMULATOR_HOST"] == "simulator"
    assert "BYBIT_ENVIRONMENT" not in gateway_env, "the default (simulator) must hold unless .env says otherwise"
    assert "simulator" in services["gateway"]["depends_on"]
    command = services["simulator"]["command"]
    assert command[:3] == ["python", "manage.py", "bybit_simulator"]
    assert command[command.index("--host") + 1] == "0.0.0.0", "reachable from the gateway's container"
    # Both sides read the same private-stream credentials, so private channels work on a first run.
    assert services["simulator"]["environment"]["BYBIT_API_KEY"] == gateway_env["BYBIT_API_KEY"]


def test_a_missing_secret_stops_compose_with_the_way_to_set_it(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        secret = compose["services"][name]["environment"]["DJANGO_SECRET_KEY"]
        assert secret.startswith("${DJANGO_SECRET_KEY:?"), (name, secret)
        assert "make .env" in secret


def test_the_api_answers_plain_http_on_a_first_run(compose: dict[str, Any]) -> None:
    """Compose publishes gunicorn as plain HTTP: HTTPS redirects (the production default) stay off unless .env asks."""
    for name in APP_SERVICES:
        assert compose["services"][name]["environment"]["DJANGO_HTTPS"] == "${DJANGO_HTTPS:-false}", name


def test_unauthenticated_uis_are_published_on_localhost_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("flower", "rabbitmq", "simulator"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert all(not str(p).startswith("127.0.0.1:") for p in services["web"]["ports"]), "the API is meant to be reached"


def test_interpolated_variables_are_documented_in_env_example() -> None:
    used = set(INTERPOLATED.findall((ROOT / "docker-compose.yml").read_text()))
    assert used, "the pattern must see compose's own variables"
    assert used <= documented_variables(), used - documented_variables()


def test_app_environment_names_settings_documented_in_env_example(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        assert set(compose["services"][name]["environment"]) <= documented_variables(), name


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="docker compose is not installed here",
)
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        env={"DJANGO_SECRET_KEY": "x" * 50, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
