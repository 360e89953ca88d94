"""``manage.py taskctx_celery_demo``: the nested bulk edit on a real Celery worker, inline and
fanned out, timed (see ``sample.library.demo.celery_demo``)."""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, CommandError

from sample.library.demo.celery_demo import failures, run_celery_demo
from sample.library.demo.celery_worker import DemoInterrupted
from sample.library.demo.records import DemoFailure
from sample.library.demo.report import terminal_console


class Command(BaseCommand):
    help = (
        "Start a celery worker (prefork pool) and publish the books twice: each book's nested "
        "task inline under the job's key, then fanned out to the pool; check both runs and "
        "print both wall times and the speed-up."
    )

    def add_arguments(self, parser):
        parser.add_argument("--books", type=int, default=16, help="books to publish (16)")
        parser.add_argument("--chapters", type=int, default=5, help="chapters per book (5)")
        parser.add_argument(
            "--delay", type=float, default=0.05, help="seconds each chapter update sleeps (0.05)"
        )
        parser.add_argument(
            "--concurrency", type=int, default=4, help="the worker's prefork processes (4)"
        )
        parser.add_argument("--timeout", type=float, default=300, help="seconds per job (300)")
        parser.add_argument("--no-fan-out", action="store_true", help="run the inline job only")

    def handle(self, *args, **options):
        if options["books"] < 1 or options["chapters"] < 1 or options["delay"] < 0:
            raise CommandError("--books and --chapters must be >= 1, --delay >= 0")
        if options["concurrency"] < 1:
            raise CommandError("--concurrency must be >= 1")
        logging.getLogger("powercrud").setLevel(logging.ERROR)
        console = terminal_console(self.stdout._out)
        try:
            runs = run_celery_demo(console, options)
        except (DemoFailure, DemoInterrupted) as exc:
            console.print(f"[red]the Celery demo failed:[/] {exc}")
            raise SystemExit(1) from None
        problems = failures(runs)
        if problems:
            console.print("[red]the Celery demo failed[/]")
            raise SystemExit(1)
        console.print(
            "[green]Celery demo passed:[/] inline, every nested task ran in the job's worker "
            "process under its key and locks and nothing reached the queue"
            + (
                "; fanned out, they ran as child tasks on the pool and the job ended after the "
                "last. All locks released."
                if len(runs) > 1
                else ". All locks released."
            )
        )
