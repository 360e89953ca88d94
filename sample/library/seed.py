"""Deterministic, realistic-looking sample data (no network, no Faker)."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction

from sample.library.models import Album, AsyncTaskRecord, Book, Chapter, Track

ADJECTIVES = [
    "Silent",
    "Crimson",
    "Hidden",
    "Northern",
    "Broken",
    "Golden",
    "Distant",
    "Quiet",
    "Forgotten",
    "Burning",
    "Hollow",
    "Velvet",
    "Iron",
    "Midnight",
    "Paper",
    "Salt",
]
NOUNS = [
    "Harbour",
    "Orchard",
    "Lantern",
    "Archive",
    "Meridian",
    "Garden",
    "River",
    "Atlas",
    "Compass",
    "Signal",
    "Winter",
    "Library",
    "Mirror",
    "Station",
    "Harvest",
    "Tide",
]
FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Byrne", "Kaur"]
CHAPTER_WORDS = [
    "Arrival",
    "The Letter",
    "Departure",
    "Old Friends",
    "Storm",
    "The Map",
    "Night Train",
    "Reckoning",
    "Homecoming",
    "The Key",
    "Crossing",
    "Embers",
    "Thaw",
    "Aftermath",
]
LABELS = ["Blue Fern Records", "Northlight", "Paper Moon", "Saltmarsh Audio", "Tidewater"]
TRACK_WORDS = ["Overture", "Drift", "Echoes", "Afterglow", "Low Tide", "Static", "Lullaby", "Coda"]


@dataclass
class SeedResult:
    books: int
    chapters: int
    albums: int
    tracks: int
    user: str


def ensure_demo_user(username: str = "demo", password: str = "demo"):
    """The staff user the sample's pages and the demo act as."""
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(
        username=username, defaults={"email": f"{username}@example.com"}
    )
    if created or not user.is_staff or not user.has_usable_password():
        user.is_staff = True
        user.is_superuser = True
        user.set_password(password)
        user.save()
    return user


@transaction.atomic
def seed(
    books: int = 20,
    chapters: int = 5,
    albums: int = 8,
    tracks: int = 6,
    *,
    reset: bool = True,
    seed_value: int = 7,
) -> SeedResult:
    """Create ``books`` books with ``chapters`` chapters each, and albums with tracks.

    ``reset`` deletes existing sample data (and powercrud dashboard rows) first. Rows are
    created with ``bulk_create``, which bypasses ``save()``: seeding launches no job.
    """
    for name, value in (
        ("books", books),
        ("chapters", chapters),
        ("albums", albums),
        ("tracks", tracks),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rng = random.Random(seed_value)
    if reset:
        Chapter.objects.all().delete()
        Book.objects.all().delete()
        Track.objects.all().delete()
        Album.objects.all().delete()
        AsyncTaskRecord.objects.all().delete()
    user = ensure_demo_user()

    base_day = dt.date(2019, 1, 1)
    book_rows = []
    for i in range(books):
        book_rows.append(
            Book(
                title=f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {i + 1}",
                author=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                genre=rng.choice(Book.Genre.values),
                # never "published": the demo publishes them
                status=rng.choice([Book.Status.DRAFT, Book.Status.IN_REVIEW]),
                edition=1,
                published_on=base_day + dt.timedelta(days=rng.randrange(0, 2000)),
            )
        )
    created_books = Book.objects.bulk_create(book_rows)
    chapter_rows = [
        Chapter(
            book=book,
            number=n,
            title=f"{n}. {rng.choice(CHAPTER_WORDS)}",
            words=rng.randrange(1500, 9000),
            status=book.status,
            edition=book.edition,
        )
        for book in created_books
        for n in range(1, chapters + 1)
    ]
    Chapter.objects.bulk_create(chapter_rows, batch_size=500)

    album_rows = []
    for i in range(albums):
        album_rows.append(
            Album(
                title=f"{rng.choice(NOUNS)} {rng.choice(['Sessions', 'Songs', 'Tapes', 'Suite'])} {i + 1}",
                artist=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                label=rng.choice(LABELS),
                # never "premium": the demo moves them there
                price_tier=rng.choice([Album.PriceTier.BUDGET, Album.PriceTier.STANDARD]),
                released_on=base_day + dt.timedelta(days=rng.randrange(0, 2000)),
            )
        )
    created_albums = Album.objects.bulk_create(album_rows)
    track_rows = [
        Track(
            album=album,
            number=n,
            title=f"{rng.choice(TRACK_WORDS)} {n}",
            duration_seconds=rng.randrange(120, 420),
            price=Album.TRACK_PRICES.get(album.price_tier, Decimal("0.99")),
        )
        for album in created_albums
        for n in range(1, tracks + 1)
    ]
    Track.objects.bulk_create(track_rows, batch_size=500)
    return SeedResult(
        books=len(created_books),
        chapters=len(chapter_rows),
        albums=len(created_albums),
        tracks=len(track_rows),
        user=user.get_username(),
    )
