"""The suite's own scheduling (tests/conftest.py): the heaviest tests are named there to start first, so a
renamed or removed one must fail here instead of silently losing its place."""
from pathlib import Path

from conftest import HEAVY_FIRST

TESTS = Path(__file__).resolve().parent


def test_every_heavy_first_entry_names_a_test_function():
    for entry in HEAVY_FIRST:
        file, function = entry.split("::")
        assert f"\ndef {function}(" in (TESTS / file).read_text(), f"{entry}: no such test"
