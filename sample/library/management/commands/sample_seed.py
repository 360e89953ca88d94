"""``manage.py sample_seed``: (re)create the sample's books, chapters, albums and tracks."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from sample.library.seed import seed


class Command(BaseCommand):
    help = "Create sample data: books with chapters, albums with tracks, and the demo user."

    def add_arguments(self, parser):
        parser.add_argument("--books", type=int, default=20, help="number of books (20)")
        parser.add_argument("--chapters", type=int, default=5, help="chapters per book (5)")
        parser.add_argument("--albums", type=int, default=8, help="number of albums (8)")
        parser.add_argument("--tracks", type=int, default=6, help="tracks per album (6)")
        parser.add_argument(
            "--keep", action="store_true", help="add to existing data instead of replacing it"
        )
        parser.add_argument("--seed", type=int, default=7, help="random seed (7)")

    def handle(self, *args, **options):
        try:
            result = seed(
                books=options["books"],
                chapters=options["chapters"],
                albums=options["albums"],
                tracks=options["tracks"],
                reset=not options["keep"],
                seed_value=options["seed"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Seeded {result.books} books with {result.chapters} chapters and "
            f"{result.albums} albums with {result.tracks} tracks; "
            f"sign in as {result.user!r} (password 'demo')."
        )
