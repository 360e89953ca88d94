"""The host's own tests (``manage.py test tests.configs.tinyapp``): plain Django, no task."""

from django.test import TestCase

from tests.configs.tinyapp.models import Note


class NoteTests(TestCase):
    def test_a_note_is_saved_and_read_back(self):
        Note.objects.create(text="hello")
        self.assertEqual(list(Note.objects.values_list("text", flat=True)), ["hello"])

    def test_each_test_starts_empty(self):
        self.assertEqual(Note.objects.count(), 0)
