"""``manage.py taskctx_fan_out_demo``: the same nested bulk edit inline and with fan-out, timed
(see ``sample.library.demo.fan_out``)."""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, CommandError

from sample.library.demo.fan_out import failures, run_fan_out_demo
from sample.library.demo.records import DemoFailure
from sample.library.demo.report import terminal_console


class Command(BaseCommand):
    help = (
        "Bulk-edit the albums twice on a multi-worker qcluster: nested launches inline, then "
        "fanned out to other workers; print both wall times and the speed-up."
    )

    def add_arguments(self, parser):
        parser.add_argument("--albums", type=int, default=8, help="albums (8)")
        parser.add_argument("--tracks", type=int, default=10, help="tracks per album (10)")
        parser.add_argument(
            "--delay", type=float, default=0.05, help="seconds each track update sleeps (0.05)"
        )
        parser.add_argument("--workers", type=int, default=4, help="qcluster workers (4)")
        parser.add_argument("--timeout", type=float, default=300, help="seconds per job (300)")

    def handle(self, *args, **options):
        if options["albums"] < 2 or options["tracks"] < 1 or options["workers"] < 1:
            raise CommandError("--albums must be >= 2, --tracks and --workers >= 1")
        logging.getLogger("django-q").setLevel(logging.WARNING)
        logging.getLogger("powercrud").setLevel(logging.ERROR)
        logging.getLogger("powercrud.async_manager").setLevel(logging.ERROR)
        console = terminal_console(self.stdout._out)
        try:
            runs = run_fan_out_demo(console, options)
        except DemoFailure as exc:
            console.print(f"[red]the fan-out demo failed:[/] {exc}")
            raise SystemExit(1) from None
        problems = failures(runs)
        for problem in problems:
            console.print(f"[red]FAILED[/] {problem}")
        if problems:
            raise SystemExit(1)
        console.print("[green]fan-out demo passed[/]")
