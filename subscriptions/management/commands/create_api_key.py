"""`manage.py create_api_key`: issue a service's API key with its scopes and print it once."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from subscriptions.models import SCOPES
from subscriptions.services import api_key_issue
from subscriptions.topics import TopicError


class Command(BaseCommand):
    help = "Issue an API key for a service and print it once (only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("service", help="service name, e.g. risk-engine")
        parser.add_argument("--label", default="", help="a note for operators, e.g. who holds the key")
        parser.add_argument(
            "--scope",
            action="append",
            dest="scopes",
            metavar="SCOPE",
            help=f"{' or '.join(SCOPES)} (repeat, or comma-separate, for several); default: market only. "
            "market: public streams, books, tickers; account: order, execution, position, balance streams "
            "and balances",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scopes = None
        if options["scopes"]:
            scopes = [s.strip() for given in options["scopes"] for s in given.split(",") if s.strip()]
        try:
            key, raw = api_key_issue(service_name=options["service"], label=options["label"], scopes=scopes)
        except TopicError as exc:
            raise CommandError(exc.message) from None
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(
            f"API key for {key.service_name} (prefix {key.prefix}, scopes {', '.join(key.scopes)}); "
            "store it now, it is not shown again:"
        )
        self.stdout.write(raw)
