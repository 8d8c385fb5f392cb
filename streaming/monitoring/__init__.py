"""Celery monitoring of the service queues and the gateway: checks, alerts, beat tasks and /metrics."""
