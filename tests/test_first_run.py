"""A fresh clone: `make` writes a local .env, and every entry point reports bad configuration in one line."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CELERY = str(Path(sys.executable).parent / "celery")
SECRET_LINE = re.compile(r"^DJANGO_SECRET_KEY=([A-Za-z0-9]{50})$", re.MULTILINE)
MISSING_SECRET = "configuration error: DJANGO_SECRET_KEY is not set"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the project as a fresh clone has it: no .env, no virtualenv, no tests."""
    ignore = shutil.ignore_patterns(".venv", ".git", ".env", "tests", "__pycache__", "*_cache", "staticfiles")
    shutil.copytree(ROOT, tmp_path / "clone", ignore=ignore)
    return tmp_path / "clone"


def bare_env(**extra: str) -> dict[str, str]:
    """Nothing exported: only what any shell has."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(extra)
    return env


def make_dotenv(where: Path) -> str:
    result = subprocess.run(["make", ".env"], cwd=where, env=bare_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return (where / ".env").read_text()


def run_all(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (each imports Django: about a second apiece)."""
    procs = [
        subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def test_make_writes_a_private_dotenv_with_a_random_secret_once(checkout: Path, tmp_path: Path) -> None:
    text = make_dotenv(checkout)
    secret = SECRET_LINE.search(text)
    assert secret, text
    assert stat.S_IMODE((checkout / ".env").stat().st_mode) == 0o600
    assert make_dotenv(checkout) == text, "an existing .env must never be rewritten"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(checkout / "Makefile", other)
    assert SECRET_LINE.search(make_dotenv(other)).group(1) != secret.group(1)


def test_dotenv_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".env"], cwd=ROOT, capture_output=True)
    assert tracked.returncode != 0


def test_commands_work_with_the_dotenv_and_nothing_exported(checkout: Path) -> None:
    make_dotenv(checkout)
    results = run_all(
        [
            [PYTHON, "manage.py", "check"],
            [PYTHON, "manage.py", "tail_events", "--help"],
            [CELERY, "-A", "wsgateway", "report"],
        ],
        checkout,
        bare_env(),
    )
    for result in results:
        assert result.returncode == 0, (result.args, result.stderr)


def test_missing_secret_stops_every_entry_point_with_one_line(checkout: Path) -> None:
    results = run_all(
        [
            [PYTHON, "manage.py", "check"],
            [PYTHON, "manage.py", "tail_events", "--service", "demo"],
            [PYTHON, "manage.py", "bybit_simulator"],
            [CELERY, "-A", "wsgateway", "worker", "-l", "info"],
            [CELERY, "-A", "wsgateway", "beat"],
            [CELERY, "-A", "wsgateway", "flower"],
        ],
        checkout,
        bare_env(),
    )
    for result in results:
        assert result.returncode == 1, (result.args, result.stderr)
        assert result.stderr.splitlines() == [result.stderr.strip()], (result.args, result.stderr)
        assert result.stderr.startswith(MISSING_SECRET), (result.args, result.stderr)
        assert "make .env" in result.stderr


def test_bad_value_stops_celery_with_the_line_manage_py_prints(checkout: Path) -> None:
    env = bare_env(DJANGO_SECRET_KEY="x" * 50, WS_GATEWAY_PORT="80a")
    manage, celery = run_all([[PYTHON, "manage.py", "check"], [CELERY, "-A", "wsgateway", "worker"]], checkout, env)
    assert manage.returncode == celery.returncode == 1
    assert celery.stderr == manage.stderr == "configuration error: WS_GATEWAY_PORT='80a' is not an integer\n"
