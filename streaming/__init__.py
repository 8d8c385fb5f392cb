"""The data plane: the gateway process, its Bybit simulator and the Celery monitors."""
