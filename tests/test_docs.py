"""The configuration reference is generated from the traits' help and must be current."""

from pathlib import Path

from labyard_hub.reference import render

DOC = Path(__file__).parent.parent / "docs" / "admin" / "reference.md"


def test_reference_is_current():
    assert DOC.read_text() == render(), "run: .venv/bin/python -m labyard_hub.reference > docs/admin/reference.md"


def test_every_option_has_help():
    text = render()
    for section in text.split("\n### ")[1:]:
        name, _, body = section.partition("\n")
        lines = [line for line in body.strip().splitlines()[1:] if line.strip()]
        assert lines, f"{name} has no help text"
