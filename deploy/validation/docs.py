"""deploy/README.md keeps the sizing table that sizing.py computes, verbatim."""

from __future__ import annotations

from pathlib import Path

from . import sizing

README = Path("deploy/README.md")


def check(root: Path) -> list[str]:
    path = root / README
    if not path.is_file():
        return [f"{README} is missing"]
    text = path.read_text(encoding="utf-8")
    if sizing.README_START not in text or sizing.README_END not in text:
        return [f"{README}: sizing table markers are missing"]
    embedded = text.split(sizing.README_START, 1)[1].split(sizing.README_END, 1)[0].strip()
    if embedded != sizing.markdown_table():
        return [f"{README}: the sizing table is stale; regenerate it with "
                "`python -m deploy.validation sizing --print` and paste it between the markers"]
    return []
