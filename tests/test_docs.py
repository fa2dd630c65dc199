"""The documentation users can read: README.md and the package cite the design notes that ship with
the repository (docs/design.md §N), never a specification outside it, and carry no internal
history (issue numbers); every cited section exists."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DESIGN_NOTES = ROOT / "docs" / "design.md"

# Text that points readers at something they cannot open or at the project's internal history.
# Case-sensitive for the spec's name, so that "docs/design.md" itself does not match.
FORBIDDEN = [
    ("a reference to the external DESIGN.md", re.compile(r"DESIGN\.md")),
    ("a reference to the external DESIGN sections", re.compile(r"DESIGN sections?\b")),
    ("an issue number", re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE)),
]
# "docs/design.md §4", "docs/design.md §7-8", "docs/design.md §2 and §10", "docs/design.md §3, §4".
CITATION = re.compile(r"docs/design\.md\s+(§\s*\d+(?:\s*[-–]\s*\d+)?(?:\s*(?:,|and)\s*§\s*\d+(?:\s*[-–]\s*\d+)?)*)")
SECTION_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)


def user_facing_files() -> list[pathlib.Path]:
    """README.md and every text file of the package (compiled modules skipped)."""
    package = [p for p in (ROOT / "unlearn_ext").rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".txt")]
    return [ROOT / "README.md"] + sorted(package)


def citing_files() -> list[pathlib.Path]:
    """Every file that may cite the design notes."""
    return (user_facing_files() + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "benchmarks" / "RESULTS.md"]
            + sorted((ROOT / "tests").glob("*.py")))


def forbidden_mentions(text: str) -> list[str]:
    """'line N: what (the text)' for each forbidden mention in text."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN:
            for match in pattern.finditer(line):
                out.append(f"line {number}: {what} ({match.group(0)!r})")
    return out


def cited_sections(text: str) -> set[int]:
    """The section numbers that the docs/design.md citations in text name (ranges expanded)."""
    sections = set()
    for citation in CITATION.finditer(text):
        for first, last in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", citation.group(1)):
            sections.update(range(int(first), int(last or first) + 1))
    return sections


def design_sections() -> list[int]:
    return [int(n) for n in SECTION_HEADING.findall(DESIGN_NOTES.read_text())]


def test_the_detectors_flag_what_they_should():
    bad = "see DESIGN section 4 and DESIGN.md; Issue 13's table; issues #7"
    assert len(forbidden_mentions(bad)) == 4
    assert forbidden_mentions("docs/design.md §4 (the design notes); the tissue 3 sample") == []
    assert cited_sections("docs/design.md §4; (docs/design.md §7-8); docs/design.md §2 and §10, §12") == {
        2, 4, 7, 8, 10, 12}


def test_design_notes_have_the_numbered_sections():
    sections = design_sections()
    assert sections == list(range(1, 14)), f"docs/design.md sections: {sections} (expected 1..13 in order)"


def test_readme_and_package_cite_only_what_ships():
    problems = []
    for path in user_facing_files():
        problems += [f"{path.relative_to(ROOT)} {p}" for p in forbidden_mentions(path.read_text())]
    assert not problems, "\n".join(problems)


def test_every_cited_section_exists():
    existing = set(design_sections())
    missing, cited = [], 0
    for path in citing_files():
        sections = cited_sections(path.read_text())
        cited += len(sections)
        missing += [f"{path.relative_to(ROOT)}: §{n}" for n in sorted(sections - existing)]
    assert cited, "no docs/design.md citation found: the citation pattern no longer matches how the docs cite"
    assert not missing, "citations of sections docs/design.md does not have:\n" + "\n".join(missing)
