"""Settings for ws-gateway, read from the environment (django-environ).

Every knob is listed in `.env.example`. A bad value stops start-up with one line naming the
variable (ImproperlyConfigured); secrets have no production-valid default and are never logged.
"""

from __future__ import annotations

import re
import ssl
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    # The OS environment wins over the file (environ.Env.read_env does not overwrite).
    environ.Env.read_env(BASE_DIR / ".env")

BYBIT_ENVIRONMENTS = ("mainnet", "testnet", "demo", "simulator")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = env.str(name, default=str(default)).strip()
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.str(name, default=str(default)).strip()
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = env.str(name, default=str(default)).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean, use true or false")


def env_choice(name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
    raw = env.str(name, default=default).strip()
    value = raw.upper() if upper else raw.lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def env_url(name: str, default: str, schemes: tuple[str, ...]) -> str:
    """Return the URL in `name`, checked for scheme and host; the error never echoes it."""
    raw = env.str(name, default=default).strip()
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a non-integer port
    except ValueError:
        raise ImproperlyConfigured(f"{name} is not a valid URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ImproperlyConfigured(
            f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)} and naming a host"
        )
    return raw


def env_file(name: str) -> str:
    """Return the path in `name`, checked to be a file; empty when unset."""
    path = env.str(name, default="").strip()
    if path and not Path(path).is_file():
        raise ImproperlyConfigured(f"{name}={path!r} is not a file")
    return path


# Django core
DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set (required unless DJANGO_DEBUG=true; `make .env` writes one for development)"
        )
    SECRET_KEY = "insecure-development-only-key"
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# HTTPS. Outside DEBUG the web process assumes it is served over HTTPS: plain HTTP is redirected
# (except /health and /metrics, which probes and scrapers call inside the network), browsers are
# told to keep to HTTPS (HSTS) and cookies travel over HTTPS only. DJANGO_HTTPS=false turns it all
# off, for plain HTTP on a trusted network; empty or unset means the default.
HTTPS = env_bool("DJANGO_HTTPS", not DEBUG) if env.str("DJANGO_HTTPS", default="").strip() else not DEBUG
SECURE_SSL_REDIRECT = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31_536_000) if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
# Behind a proxy that terminates TLS, the header it sets to "https" (e.g. X-Forwarded-Proto); without
# it every request looks like plain HTTP and is redirected forever. Set it only if the proxy always
# overwrites that header: a client could send it too.
SECURE_PROXY_SSL_HEADER: tuple[str, str] | None = None
_proxy_header = env.str("DJANGO_SECURE_PROXY_SSL_HEADER", default="").strip()
if _proxy_header:
    if not re.fullmatch(r"[A-Za-z0-9-]+", _proxy_header):
        raise ImproperlyConfigured(f"DJANGO_SECURE_PROXY_SSL_HEADER={_proxy_header!r} is not a header name")
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "axes",
    "drf_spectacular_sidecar",
    "subscriptions",
    "streaming",
]

MIDDLEWARE = [
    "wsgateway.logging.RequestTraceMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: turns a locked-out admin login into its 429 page.
    "axes.middleware.AxesMiddleware",
]
# Axes first: it refuses a locked-out login before the password is even checked.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]

ROOT_URLCONF = "wsgateway.urls"
WSGI_APPLICATION = "wsgateway.wsgi.application"
ASGI_APPLICATION = "wsgateway.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "wsgateway" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_url(
    "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/wsgateway", ("postgres", "postgresql", "pgsql")
)
DATABASES = {"default": env.db_url_config(DATABASE_URL)}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env_int("DATABASE_CONNECT_TIMEOUT", 5, 1)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Without a manifest, so a checkout that never ran collectstatic (tests, make demo) still works.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# A checkout that never ran collectstatic (make demo, a local gunicorn) still serves the admin's
# and the API docs' assets; the Docker image collects them at build time.
WHITENOISE_USE_FINDERS = DEBUG or not STATIC_ROOT.is_dir()

# Services
RABBITMQ_URL = env_url("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//", ("amqp", "amqps"))
# TLS for amqps:// URLs: the CA that signed the broker's certificate (empty: the system CAs),
# whether to verify it and the host name (never turn off in production), and an optional client
# certificate for brokers that require one.
RABBITMQ_TLS_CA_FILE = env_file("RABBITMQ_TLS_CA_FILE")
RABBITMQ_TLS_VERIFY = env_bool("RABBITMQ_TLS_VERIFY", True)
RABBITMQ_TLS_CERT_FILE = env_file("RABBITMQ_TLS_CERT_FILE")
RABBITMQ_TLS_KEY_FILE = env_file("RABBITMQ_TLS_KEY_FILE")
if RABBITMQ_TLS_KEY_FILE and not RABBITMQ_TLS_CERT_FILE:
    raise ImproperlyConfigured("RABBITMQ_TLS_KEY_FILE is set without RABBITMQ_TLS_CERT_FILE")
RABBITMQ_MANAGEMENT_URL = env.str("RABBITMQ_MANAGEMENT_URL", default="http://127.0.0.1:15672")
if RABBITMQ_MANAGEMENT_URL:
    RABBITMQ_MANAGEMENT_URL = env_url("RABBITMQ_MANAGEMENT_URL", RABBITMQ_MANAGEMENT_URL, ("http", "https"))
REDIS_URL = env_url("REDIS_URL", "redis://127.0.0.1:6379/0", ("redis", "rediss", "unix"))
# Every Redis key the project writes starts with this prefix (tests and shards isolate by it).
REDIS_KEY_PREFIX = env.str("REDIS_KEY_PREFIX", default="ws-gateway:")
HEALTH_CHECK_TIMEOUT = env_float("HEALTH_CHECK_TIMEOUT", 1.5, 0.1)

# Web
WS_GATEWAY_PORT = env_int("WS_GATEWAY_PORT", 4400, 1)
if WS_GATEWAY_PORT > 65535:
    raise ImproperlyConfigured(f"WS_GATEWAY_PORT={WS_GATEWAY_PORT} is not a TCP port")
# The operator key acts for every service; empty disables it.
WS_GATEWAY_API_KEY = env.str("WS_GATEWAY_API_KEY", default="")
# Reverse proxies in front of the web process that append to X-Forwarded-For (0: use the socket's
# address). The API throttle and the admin lockout both identify callers this way.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)
# Failed API-key attempts allowed per client address and window; past it, 429 with Retry-After
# until the window ends (0 turns the throttle off). Counted in Redis, so every web worker agrees.
AUTH_FAILURE_LIMIT = env_int("AUTH_FAILURE_LIMIT", 20)
AUTH_FAILURE_WINDOW = env_int("AUTH_FAILURE_WINDOW", 300, 1)

# Admin login lockout (django-axes): attempts are kept in PostgreSQL, so every web worker sees
# them and operators see them in the admin (Axes section); `manage.py axes_reset` lifts a lockout.
AXES_LOCKOUT_CHOICES = {
    "ip_and_username": [["ip_address", "username"]],
    "ip": ["ip_address"],
    "username": ["username"],
}
AXES_ENABLED = env_bool("AXES_ENABLED", True)
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, 1)
AXES_COOLOFF_TIME = timedelta(minutes=env_float("AXES_COOLOFF_MINUTES", 15.0, 0.1))
AXES_LOCKOUT_PARAMETERS = AXES_LOCKOUT_CHOICES[
    env_choice("AXES_LOCKOUT_BY", "ip_and_username", tuple(AXES_LOCKOUT_CHOICES))
]
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_CLIENT_IP_CALLABLE = "subscriptions.authentication.client_ip"
AXES_RESET_ON_SUCCESS = True
# No start-up banner in every command's output; failed logins and lockouts are still logged.
AXES_VERBOSE = False

# Bybit
BYBIT_ENVIRONMENT = env_choice("BYBIT_ENVIRONMENT", "simulator", BYBIT_ENVIRONMENTS)
BYBIT_WS_URL = env.str("BYBIT_WS_URL", default="")
if BYBIT_WS_URL:
    BYBIT_WS_URL = env_url("BYBIT_WS_URL", BYBIT_WS_URL, ("ws", "wss")).rstrip("/")
# Overrides the REST base URL; empty derives it from BYBIT_ENVIRONMENT (streaming.bybitrest.base_url).
BYBIT_REST_URL = env.str("BYBIT_REST_URL", default="")
if BYBIT_REST_URL:
    BYBIT_REST_URL = env_url("BYBIT_REST_URL", BYBIT_REST_URL, ("http", "https")).rstrip("/")
BYBIT_API_KEY = env.str("BYBIT_API_KEY", default="")
BYBIT_API_SECRET = env.str("BYBIT_API_SECRET", default="")
if bool(BYBIT_API_KEY) != bool(BYBIT_API_SECRET):
    raise ImproperlyConfigured("BYBIT_API_KEY and BYBIT_API_SECRET must be set together")

# Simulator (manage.py bybit_simulator, make demo)
SIMULATOR_HOST = env.str("SIMULATOR_HOST", default="127.0.0.1")
SIMULATOR_PORT = env_int("SIMULATOR_PORT", 8765, 0)
SIMULATOR_SEED = env_int("SIMULATOR_SEED", 1)

# Gateway (manage.py run_gateway)
GATEWAY_PING_INTERVAL = env_float("GATEWAY_PING_INTERVAL", 20.0, 0.05)
GATEWAY_DEAD_AFTER = env_float("GATEWAY_DEAD_AFTER", 45.0, 0.1)
GATEWAY_CONNECT_TIMEOUT = env_float("GATEWAY_CONNECT_TIMEOUT", 10.0, 0.1)
GATEWAY_BACKOFF_BASE = env_float("GATEWAY_BACKOFF_BASE", 0.5, 0.001)
GATEWAY_BACKOFF_CAP = env_float("GATEWAY_BACKOFF_CAP", 30.0, 0.001)
GATEWAY_HEALTHY_AFTER = env_float("GATEWAY_HEALTHY_AFTER", 60.0, 0.0)
GATEWAY_CIRCUIT_FAILURES = env_int("GATEWAY_CIRCUIT_FAILURES", 5, 1)
GATEWAY_CIRCUIT_WINDOW = env_float("GATEWAY_CIRCUIT_WINDOW", 60.0, 0.1)
GATEWAY_CIRCUIT_COOLDOWN = env_float("GATEWAY_CIRCUIT_COOLDOWN", 60.0, 0.01)
# Longest wait between auth attempts while Bybit refuses the API key.
GATEWAY_AUTH_RETRY_CAP = env_float("GATEWAY_AUTH_RETRY_CAP", 60.0, 0.01)
# Seconds a subscribe/unsubscribe waits for its reply before it is sent again.
GATEWAY_REPLY_TIMEOUT = env_float("GATEWAY_REPLY_TIMEOUT", 10.0, 0.01)
GATEWAY_RECONCILE_INTERVAL = env_float("GATEWAY_RECONCILE_INTERVAL", 5.0, 0.05)
GATEWAY_HANDOFF_SIZE = env_int("GATEWAY_HANDOFF_SIZE", 50_000, 10)
GATEWAY_CONFIRM_WINDOW = env_int("GATEWAY_CONFIRM_WINDOW", 2_000, 1)
# While this many market events wait for the publisher, books and tickers conflate to their newest state.
GATEWAY_CONFLATE_AT = env_int("GATEWAY_CONFLATE_AT", 1_000, 0)
# While the gateway reads frames this many ms later than its usual read lag, each book and
# ticker topic is published at most once per GATEWAY_CONFLATE_INTERVAL_MS (its newest state),
# an interval that doubles every 250 ms reads stay late, up to ..._MAX_INTERVAL_MS, and halves
# every 4 s they are on time (below ..._INTERVAL_MS pacing ends).
GATEWAY_LAG_LIMIT_MS = env_int("GATEWAY_LAG_LIMIT_MS", 100, 1)
GATEWAY_CONFLATE_INTERVAL_MS = env_int("GATEWAY_CONFLATE_INTERVAL_MS", 100, 1)
GATEWAY_CONFLATE_MAX_INTERVAL_MS = env_int("GATEWAY_CONFLATE_MAX_INTERVAL_MS", 1_000, 1)
# Consumers behind count as reading late: while a service's market queue that has a consumer
# holds more than this many messages (looked at every 0.2 s), books and tickers are paced as
# above. 0: only the gateway's own read lag counts.
GATEWAY_CONSUMER_BACKLOG = env_int("GATEWAY_CONSUMER_BACKLOG", 500, 0)
# Far behind: while paced, a book delta read this many ms later than the usual read lag has the
# topic resynced from a fresh snapshot, its queued deltas skipped meanwhile. 0: never.
GATEWAY_SHED_LAG_MS = env_int("GATEWAY_SHED_LAG_MS", 100, 0)
# Every queue and binding is declared again this often (and at once after a publisher reconnect
# or a returned publish), so one deleted by an operator comes back by itself.
GATEWAY_REDECLARE_INTERVAL = env_float("GATEWAY_REDECLARE_INTERVAL", 30.0, 0.1)
# Private events a full queue refused, kept per queue; past it, later ones go to <queue>.overflow.
GATEWAY_PARK_LIMIT = env_int("GATEWAY_PARK_LIMIT", 10_000, 1)
# Private-state recovery from Bybit's REST API after every gap (docs/gateway.md "Recovery").
GATEWAY_BACKFILL_OVERLAP_MS = env_int("GATEWAY_BACKFILL_OVERLAP_MS", 10_000, 0)
GATEWAY_BACKFILL_FIRST_WINDOW_S = env_int("GATEWAY_BACKFILL_FIRST_WINDOW_S", 900, 0)
GATEWAY_HANDOVER_FLUSH_S = env_float("GATEWAY_HANDOVER_FLUSH_S", 1.0, 0.0)
# Socket reads pause (at most GATEWAY_MAX_READ_PAUSE s) while this many market events wait.
GATEWAY_BACKPRESSURE_AT = env_int("GATEWAY_BACKPRESSURE_AT", 5_000, 1)
GATEWAY_MAX_READ_PAUSE = env_float("GATEWAY_MAX_READ_PAUSE", 0.5, 0.0)
# Market state: local order books (u continuity, gap repair), merged tickers, last-value cache.
GATEWAY_ORDERBOOKS = env_bool("GATEWAY_ORDERBOOKS", True)
LVC_BOOK_DEPTH = env_int("LVC_BOOK_DEPTH", 50, 1)
LVC_FLUSH_INTERVAL_MS = env_int("LVC_FLUSH_INTERVAL_MS", 10, 1)
GATEWAY_LOCK_TTL = env_float("GATEWAY_LOCK_TTL", 5.0, 0.5)
GATEWAY_STATUS_INTERVAL = env_float("GATEWAY_STATUS_INTERVAL", 1.0, 0.05)
GATEWAY_STATUS_STALE_AFTER = env_float("GATEWAY_STATUS_STALE_AFTER", 5.0, 0.1)
GATEWAY_MAX_FRAME_BYTES = env_int("GATEWAY_MAX_FRAME_BYTES", 4 * 1024 * 1024, 1024)
# uvloop receives ~20% more frames per second than asyncio's own loop (measured in make bench).
GATEWAY_UVLOOP = env_bool("GATEWAY_UVLOOP", True)

# Queue retention per event class (x-max-length; 0 = unlimited). Market data drops the
# oldest on overflow; private classes reject new messages so nothing is lost silently.
QUEUE_MAX_LENGTH = {
    "trade": env_int("QUEUE_MAX_LENGTH_TRADE", 100_000),
    "ticker": env_int("QUEUE_MAX_LENGTH_TICKER", 10_000),
    "orderbook": env_int("QUEUE_MAX_LENGTH_ORDERBOOK", 50_000),
    "kline": env_int("QUEUE_MAX_LENGTH_KLINE", 10_000),
    "liquidation": env_int("QUEUE_MAX_LENGTH_LIQUIDATION", 10_000),
    "order": env_int("QUEUE_MAX_LENGTH_ORDER", 1_000_000),
    "execution": env_int("QUEUE_MAX_LENGTH_EXECUTION", 1_000_000),
    "position": env_int("QUEUE_MAX_LENGTH_POSITION", 1_000_000),
    "balance": env_int("QUEUE_MAX_LENGTH_BALANCE", 1_000_000),
}
# x-message-ttl for market-data queues in ms (0 = none); private queues never expire messages.
QUEUE_MARKET_TTL_MS = env_int("QUEUE_MARKET_TTL_MS", 0)
# A service queue no live subscription uses is deleted this many hours after its last subscription
# ended (cancelled or failed), by a beat task; a private queue only once empty. 0: never by itself
# (DELETE /api/v1/queues/<name> and the admin still delete one on request).
QUEUE_DELETE_AFTER_HOURS = env_float("QUEUE_DELETE_AFTER_HOURS", 24.0)

# Monitoring
MONITOR_BACKLOG_WARNING = env_int("MONITOR_BACKLOG_WARNING", 1_000)
MONITOR_BACKLOG_CRITICAL = env_int("MONITOR_BACKLOG_CRITICAL", 10_000)
MONITOR_RETENTION_WARNING = env_float("MONITOR_RETENTION_WARNING", 0.80)
MONITOR_RETENTION_CRITICAL = env_float("MONITOR_RETENTION_CRITICAL", 0.95)
MONITOR_STALE_SUBSCRIPTION_AFTER = env_float("MONITOR_STALE_SUBSCRIPTION_AFTER", 300.0)
MONITOR_SAMPLE_RETENTION_HOURS = env_int("MONITOR_SAMPLE_RETENTION_HOURS", 24, 1)
# Beat runs the queue and gateway checks every MONITOR_INTERVAL seconds (RabbitMQ's management
# figures refresh every 5 s by default, so a shorter interval only repeats them).
MONITOR_INTERVAL = env_float("MONITOR_INTERVAL", 15.0, 1.0)
# A queue with consumers whose depth grew in each of this many consecutive samples is a slow subscriber.
MONITOR_SLOW_SAMPLES = env_int("MONITOR_SLOW_SAMPLES", 3, 1)
# The gateway.quarantined alert stays up this many seconds after the last private item sent to
# quarantine (`<class>.unknown`: a field Bybit should send was missing).
MONITOR_QUARANTINE_ALERT_FOR = env_float("MONITOR_QUARANTINE_ALERT_FOR", 3600.0, 1.0)
ALERT_WEBHOOK_TIMEOUT = env_float("ALERT_WEBHOOK_TIMEOUT", 3.0, 0.1)
ALERT_WEBHOOK_URL = env.str("ALERT_WEBHOOK_URL", default="")
if ALERT_WEBHOOK_URL:
    ALERT_WEBHOOK_URL = env_url("ALERT_WEBHOOK_URL", ALERT_WEBHOOK_URL, ("http", "https"))

# Celery: RabbitMQ broker, Redis results, JSON only.
CELERY_BROKER_URL = RABBITMQ_URL
# py-amqp's TLS options for amqps:// (kombu fills in server_hostname from the URL); also used by the API's nudges.
CELERY_BROKER_USE_SSL: dict | bool = False
if RABBITMQ_URL.startswith("amqps://"):
    CELERY_BROKER_USE_SSL = {"cert_reqs": ssl.CERT_REQUIRED if RABBITMQ_TLS_VERIFY else ssl.CERT_NONE}
    if RABBITMQ_TLS_VERIFY:
        CELERY_BROKER_USE_SSL["server_hostname"] = None
    if RABBITMQ_TLS_CA_FILE:
        CELERY_BROKER_USE_SSL["ca_certs"] = RABBITMQ_TLS_CA_FILE
    if RABBITMQ_TLS_CERT_FILE:
        CELERY_BROKER_USE_SSL.update(certfile=RABBITMQ_TLS_CERT_FILE, keyfile=RABBITMQ_TLS_KEY_FILE or None)
CELERY_RESULT_BACKEND = env_url("CELERY_RESULT_BACKEND", REDIS_URL, ("redis", "rediss", "unix"))
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_TIME_LIMIT = 60
CELERY_TASK_SOFT_TIME_LIMIT = 45
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
# autodiscover_tasks() finds only <app>.tasks; the monitor's tasks sit one package down.
CELERY_IMPORTS = ["streaming.monitoring.tasks"]
# Each run expires before the next one is due, so a stalled worker never gets a backlog of checks.
CELERY_BEAT_SCHEDULE = {
    "monitor-queues": {
        "task": "streaming.monitoring.tasks.monitor_queues",
        "schedule": MONITOR_INTERVAL,
        "options": {"expires": MONITOR_INTERVAL * 0.8},
    },
    "monitor-gateway": {
        "task": "streaming.monitoring.tasks.monitor_gateway",
        "schedule": MONITOR_INTERVAL,
        "options": {"expires": MONITOR_INTERVAL * 0.8},
    },
    "delete-unused-queues": {
        "task": "streaming.monitoring.tasks.delete_unused_queues",
        "schedule": 300.0,
        "options": {"expires": 240.0},
    },
    "prune-queue-samples": {
        "task": "streaming.monitoring.tasks.prune_queue_samples",
        "schedule": 3600.0,
        "options": {"expires": 1800.0},
    },
}

# Logging
LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True)
LOG_FORMAT = env_choice("LOG_FORMAT", "console" if DEBUG else "json", LOG_FORMATS)
LOGGING_CONFIG = None  # wsgateway.logging configures logging once, below.

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "subscriptions.authentication.ApiKeyAuthentication",
        "subscriptions.authentication.StaffSessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "subscriptions.queryparams.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Bodies are JSON only: a body sent as a form (curl -d without a Content-Type) is a 415 saying so.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "wsgateway.views.JsonBodyNegotiation",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "EXCEPTION_HANDLER": "subscriptions.views.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ws-gateway API",
    "DESCRIPTION": "Subscriptions to Bybit V5 streams, delivered through RabbitMQ.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI and Redoc from drf-spectacular-sidecar (pinned in requirements/base.txt), served
    # by the project: the docs work offline and never load a script from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The contract: JSON bodies and the X-API-Key header. The form parsers and the staff session
    # serve the browsable API only. Enums stay inline, where each field or parameter states them.
    "PARSER_WHITELIST": ["rest_framework.parsers.JSONParser"],
    "AUTHENTICATION_WHITELIST": ["subscriptions.authentication.ApiKeyAuthentication"],
    "POSTPROCESSING_HOOKS": ["subscriptions.views.document_errors"],
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
}

from wsgateway.logging import configure_logging  # noqa: E402

configure_logging(LOG_LEVEL, LOG_FORMAT)
