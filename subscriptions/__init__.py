"""The control plane: subscriptions, API keys, the topic catalogue and the REST API."""
