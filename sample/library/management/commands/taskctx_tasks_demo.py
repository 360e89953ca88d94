"""``manage.py taskctx_tasks_demo``: the nested bulk edit through ``django.tasks`` and a real
``db_worker`` (see ``sample.library.demo.django_tasks``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from sample.library.demo.django_tasks import run_tasks_demo
from sample.library.demo.records import DemoFailure
from sample.library.demo.report import terminal_console
from sample.library.demo.tasks_fan_out import run_tasks_fan_out


class Command(BaseCommand):
    help = (
        "Run the nested bulk edit through Django's task framework: one task publishes the "
        "books, each book's nested .enqueue() runs inline under its key in a real db_worker."
    )

    def add_arguments(self, parser):
        parser.add_argument("--books", type=int, default=20, help="books to seed and publish (20)")
        parser.add_argument("--chapters", type=int, default=5, help="chapters per book (5)")
        parser.add_argument(
            "--delay", type=float, default=0.02, help="seconds each chapter update sleeps (0.02)"
        )
        parser.add_argument(
            "--timeout", type=float, default=300, help="seconds the task may take (300)"
        )
        parser.add_argument(
            "--fan-out-workers",
            type=int,
            default=3,
            help="db_workers of the second run, where each book's task fans out (3; 0: no "
            "second run)",
        )

    def handle(self, *args, **options):
        if options["books"] < 1 or options["chapters"] < 0 or options["delay"] < 0:
            raise CommandError("--books must be >= 1, --chapters and --delay >= 0")
        if options["fan_out_workers"] < 0:
            raise CommandError("--fan-out-workers must be >= 0")
        console = terminal_console(self.stdout._out)
        try:
            report = run_tasks_demo(console, options)
            fanned = None
            if not report.failures and options["fan_out_workers"]:
                fanned = run_tasks_fan_out(console, options, report.job_s)
        except DemoFailure as exc:
            console.print(f"[red]the django.tasks demo failed:[/] {exc}")
            raise SystemExit(1) from None
        if report.failures or (fanned is not None and fanned.failures):
            console.print("[red]the django.tasks demo failed[/]")
            raise SystemExit(1)
        console.print(
            "[green]django.tasks demo passed:[/] the nested tasks ran inline under the job's "
            "key and locks, nothing reached the queue, all locks released"
            + (
                "; with fan-out they ran as child tasks on several db_workers and the job "
                "ended after the last."
                if fanned is not None
                else "."
            )
        )
