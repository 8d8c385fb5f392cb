"""structlog set-up for Django, Celery and management commands, and the request trace id."""

from __future__ import annotations

import logging
import logging.config
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from django.http import HttpRequest, HttpResponse

TRACE_HEADER = "X-Request-ID"
REDACTED = "[redacted]"
# Keys whose values never reach a log line, matched case-insensitively anywhere in the key.
SECRET_KEY_PATTERN = re.compile(r"(api[_-]?key|secret|signature|password|passwd|token|authorization|sign)", re.I)
# Values that look like credentials embedded in URLs (amqp://user:pass@host).
# Bounded repeats: a long path or body in a log value costs linear time, not quadratic.
URL_PASSWORD_PATTERN = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]{0,30}://[^:/@\s]{1,256}:)[^@\s]{1,512}@", re.I)
TRACE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return URL_PASSWORD_PATTERN.sub(rf"\g<scheme>{REDACTED}@", value) if "://" in value else value
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY_PATTERN.search(str(k)) else redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace the values of secret-looking keys, and passwords inside URLs."""
    for key, value in event_dict.items():
        if SECRET_KEY_PATTERN.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_value(value)
    return event_dict


def configure_logging(level: str, fmt: str) -> None:
    """Route stdlib logging (Django, Celery, libraries) and structlog through one renderer."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structlog": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
                    "foreign_pre_chain": shared,
                }
            },
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structlog"}},
            "root": {"handlers": ["console"], "level": level},
            "loggers": {
                # One line per request is the access log's job, not Django's.
                "django.server": {"level": "WARNING"},
                "websockets": {"level": "WARNING"},
                "amqp": {"level": "WARNING"},
            },
        }
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def new_trace_id() -> str:
    return uuid.uuid4().hex


class RequestTraceMiddleware:
    """Bind a trace id to every log line of a request and echo it in `X-Request-ID`."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.log = structlog.get_logger("wsgateway.request")

    def __call__(self, request: HttpRequest) -> HttpResponse:
        sent = request.headers.get(TRACE_HEADER, "")
        trace_id = sent if TRACE_ID_PATTERN.match(sent) else new_trace_id()
        request.trace_id = trace_id  # type: ignore[attr-defined]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(trace_id=trace_id)
        try:
            response = self.get_response(request)
            response[TRACE_HEADER] = trace_id
            self.log.info("http.request", method=request.method, path=request.path, status=response.status_code)
            return response
        finally:
            structlog.contextvars.clear_contextvars()


class LogThrottle:
    """Allow one log line per `interval` seconds per key; count what was held back.

    For hot paths (malformed frames, nacks): the first occurrence is logged at once, later
    ones are summed into `suppressed` on the next line, so volume goes to counters.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] | None = None) -> None:
        self.interval = interval
        self.clock = clock or time.monotonic
        self.next_at: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """Return the number of suppressed lines to report if a line may be logged now, else None."""
        now = self.clock()
        if now < self.next_at.get(key, 0.0):
            self.held[key] = self.held.get(key, 0) + 1
            return None
        self.next_at[key] = now + self.interval
        return self.held.pop(key, 0)

    def overdue(self) -> dict[str, int]:
        """Take the held counts whose window has ended: no line reported them, so the caller must."""
        now = self.clock()
        due = {key: count for key, count in self.held.items() if now >= self.next_at.get(key, 0.0)}
        for key in due:
            del self.held[key]
        return due
