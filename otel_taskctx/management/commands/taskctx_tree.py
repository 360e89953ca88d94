"""``manage.py taskctx_tree <task_key>``: print a job's span tree in the terminal."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from otel_taskctx.spans.render import format_duration, render_text


class Command(BaseCommand):
    help = (
        "Print the stored span tree of a job: one span per line, indented by depth, with "
        "duration and status (* marks the critical path). TASK_KEY may be the root task key "
        "or the key of any task nested in it."
    )

    def add_arguments(self, parser):
        parser.add_argument("task_key")
        parser.add_argument("--events", action="store_true", help="also print progress and locks")
        parser.add_argument("--json", action="store_true", help="print the tree as JSON")
        parser.add_argument(
            "--no-flush",
            action="store_true",
            help="do not write this process's pending spans first",
        )

    def handle(self, *args, **options):
        from otel_taskctx.spans import flush_span_store
        from otel_taskctx.spans.queries import load_tree

        if not options["no_flush"]:
            flush_span_store(include_exporters=False)
        tree = load_tree(options["task_key"])
        if tree is None:
            raise CommandError(f"no stored spans for task {options['task_key']!r}")
        if options["json"]:
            self.stdout.write(json.dumps(tree.to_dict(), indent=2, default=str))
            return
        summary = tree.summary()
        end = "running" if summary["end_ns"] is None else format_duration(tree.duration_ns)
        header = (
            f"job {summary['root_task_key']}: {summary['status'].upper()} {end}, "
            f"{summary['spans']} spans, {summary['tasks']} task(s), "
            f"{summary['descendants_locked']} descendant(s) locked"
        )
        if summary["user_label"] or summary["user_id"]:
            header += f", user {summary['user_label'] or summary['user_id']}"
        self.stdout.write(header)
        for line in render_text(tree, show_events=options["events"]):
            self.stdout.write(line)
        if tree.target is not None:
            self.stdout.write(f"{tree.target_reason}: {tree.target.name} ({tree.target.id})")
        if tree.truncated:
            self.stdout.write("(tree truncated: too many spans)")
