"""Rule folders for tests: the shipped rules, changed in one place."""

from __future__ import annotations

import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[2] / "rules"


def consent_rules(folder: Path) -> Path:
    """A copy of the shipped rules in `folder`, with research consent-required
    (docs/consent.md)."""
    shutil.copytree(SHIPPED, folder)
    cats = folder / "categories.toml"
    text = cats.read_text()
    marker = 'name = "research"\n'
    assert marker in text
    cats.write_text(text.replace(marker, marker + 'consent = "required"\n'))
    return folder
