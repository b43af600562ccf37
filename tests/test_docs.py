"""The repository's docs resolve inside it: every "facts §n" / "digest §n" the code and configs
cite names a section of docs/paper-facts.md / docs/flexgen-digest.md, and the README points at
nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = {"facts": REPO / "docs" / "paper-facts.md", "digest": REPO / "docs" / "flexgen-digest.md"}
CITATION = re.compile(r"\b(facts|digest) §(\d+(?:\.\d+)?)")
CITING = ["flexgen_lab", "tests", "benchmarks", "conf", "experiments", "notebooks", "docs"]


def sections(doc: Path) -> set[str]:
    """Section numbers of a doc's headings: '## 7. Cost model' -> '7', '### 7.3 Obj' -> '7.3'."""
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc.read_text(), re.MULTILINE))


def citations() -> list[tuple[str, str, str]]:
    """(file, doc, section) of every citation in the package, tests, configs and docs."""
    files = [REPO / "README.md"] + [p for d in CITING for p in (REPO / d).rglob("*")
                                    if p.suffix in (".py", ".yaml", ".md", ".ipynb")]
    return [(str(p.relative_to(REPO)), doc, number) for p in files
            for doc, number in CITATION.findall(p.read_text())]


def test_sections_are_read_from_headings():
    assert {"1", "2", "9"} <= sections(DOCS["facts"])
    assert {"2.2", "6", "7.1", "7.3"} <= sections(DOCS["digest"])


def test_every_cited_section_exists():
    found = citations()
    assert len(found) > 10  # the code does cite them
    have = {doc: sections(path) for doc, path in DOCS.items()}
    missing = [(f, doc, n) for f, doc, n in found if n not in have[doc]]
    assert not missing


def test_readme_points_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "../" not in readme and "DESIGN.md" not in readme
    named = re.findall(r"docs/[\w.-]+\.md", readme)
    assert "docs/architecture.md" in named
    assert all((REPO / path).is_file() for path in named), named
