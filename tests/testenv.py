"""Loaded with `-p` before pytest-django sets Django up: the environment the suite runs in.

Tests isolate themselves from a developer's running services by their own database
(pytest-django's test_ prefix), RabbitMQ vhost and Redis key prefix (fixtures in conftest).
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-production")
os.environ.setdefault("DJANGO_DEBUG", "false")
# The test client speaks plain HTTP; production's HTTPS redirect would answer every request with a 301.
os.environ.setdefault("DJANGO_HTTPS", "false")
os.environ.setdefault("LOG_FORMAT", "console")
os.environ.setdefault("LOG_LEVEL", "INFO")
os.environ.setdefault("BYBIT_ENVIRONMENT", "simulator")
# Failed-key counters live in Redis per client address, and every test process here calls from
# 127.0.0.1: off by default, on in the tests that check it (with their own key prefix).
os.environ.setdefault("AUTH_FAILURE_LIMIT", "0")
# Scales every wait in the suite, for slow machines (as websockets' own tests do).
os.environ.setdefault("WSGATEWAY_TESTS_TIMEOUT_FACTOR", "1")
