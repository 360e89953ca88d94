"""``manage.py taskctx_demo``: the nested bulk-edit demo (see the ``sample.library.demo`` package)."""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, CommandError

from sample.library import demo, serve
from sample.library.demo.report import terminal_console

#: seconds per descendant update: the terminal demo, and --serve (the browser's modal polls
#: once a second; at 0.3 s a chapter, each book's nested steps show for 1.5 s, and every step
#: is written: the progress throttle, PROGRESS_MIN_INTERVAL 0.25 s, is shorter than one)
DEMO_DELAY = 0.05
SERVE_DELAY = 0.3


class Command(BaseCommand):
    help = (
        "Run powercrud bulk edits whose save() does nested async work on a real qcluster and "
        "show, with live progress, that the nested work ran inline under the job's locks. "
        "With --serve, start runserver and the cluster for the browser UI instead."
    )

    def add_arguments(self, parser):
        parser.add_argument("--books", type=int, default=20, help="books to seed and publish (20)")
        parser.add_argument("--chapters", type=int, default=5, help="chapters per book (5)")
        parser.add_argument("--albums", type=int, default=8, help="albums to seed and reprice (8)")
        parser.add_argument("--tracks", type=int, default=6, help="tracks per album (6)")
        parser.add_argument(
            "--delay",
            type=float,
            default=None,
            help="seconds each descendant update sleeps, so progress is visible "
            f"({DEMO_DELAY}; with --serve {SERVE_DELAY}: a person sees each nested step)",
        )
        parser.add_argument("--workers", type=int, default=2, help="qcluster workers (2)")
        parser.add_argument(
            "--timeout", type=float, default=300, help="seconds a job may take (300)"
        )
        parser.add_argument("--report", metavar="FILE", help="also write the facts as JSON")
        parser.add_argument(
            "--serve",
            action="store_true",
            help="start runserver and the cluster for the browser UI (Ctrl-C stops both)",
        )
        parser.add_argument("--host", default="127.0.0.1", help="--serve: address (127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="--serve: port (8000)")
        parser.add_argument(
            "--reseed", action="store_true", help="--serve: replace existing data with new seed"
        )

    def handle(self, *args, **options):
        for name in ("books", "chapters", "albums", "tracks", "workers"):
            if options[name] < (1 if name == "workers" else 0):
                raise CommandError(f"--{name} must be positive")
        if options["delay"] is None:
            options["delay"] = SERVE_DELAY if options["serve"] else DEMO_DELAY
        if options["delay"] < 0:
            raise CommandError("--delay must be >= 0")
        # the cluster logs to its own file; here only the demo's own output
        logging.getLogger("django-q").setLevel(logging.WARNING)
        logging.getLogger("powercrud").setLevel(logging.ERROR)
        logging.getLogger("powercrud.async_manager").setLevel(logging.ERROR)
        console = terminal_console(self.stdout._out)
        if options["serve"]:
            try:
                serve.serve(console, options)
            except demo.DemoFailure as exc:
                raise CommandError(str(exc)) from exc
            except Exception as exc:
                if options.get("traceback"):
                    raise
                raise CommandError(f"{type(exc).__name__}: {exc}") from exc
            return
        reports: list[demo.JobReport] = []
        error = None
        try:
            reports = demo.run_demo(console, options)
        except demo.DemoFailure as exc:
            error = str(exc)
        except Exception as exc:  # a database or broker that cannot be reached, a bug...
            if options.get("traceback"):
                raise
            error = f"{type(exc).__name__}: {exc} (run with --traceback for details)"
        failures = demo.iter_failures(reports)
        ok = error is None and not failures and bool(reports)
        if options["report"]:
            demo.write_report(options["report"], reports, ok, error)
        if not ok:
            reasons = ([error] if error else []) + failures
            raise CommandError("the demo failed:\n  " + "\n  ".join(reasons))
        console.print(
            "[bold green]demo passed[/]: every job succeeded, its descendants were updated "
            "inline under its locks, no nested job escaped to the queue, all locks released."
        )
