"""Every design-document section the code cites exists: ``docs/design.md, "<heading>"`` names a heading,
``docs/design.md step N`` (or ``steps N-M``) a numbered step of "The method, step by step"."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.glob("amodal/**/*.py"), *ROOT.glob("producer/*.py"), *ROOT.glob("workers/*.py"),
           *ROOT.glob("tasks/*.py"), *ROOT.glob("bench/*.py"), ROOT / "celeryconfig.py"]
CITATION = re.compile(r'docs/design\.md(?:, "(?P<section>[^"]+)"| steps? (?P<first>\d+)(?:-(?P<last>\d+))?)')


def test_every_cited_section_and_step_exists():
    design = (ROOT / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^#+ (.+?)\s*$", design, re.M))
    steps = {int(n) for n in re.findall(r"^(\d+)\. \*\*", design, re.M)}
    cited, missing = 0, []
    for path in SOURCES:
        for match in CITATION.finditer(path.read_text()):
            cited += 1
            if match["section"] and match["section"] not in headings:
                missing.append(f"{path.relative_to(ROOT)}: section {match['section']!r}")
            for n in range(int(match["first"] or 0), int(match["last"] or match["first"] or 0) + 1):
                if match["first"] and n not in steps:
                    missing.append(f"{path.relative_to(ROOT)}: step {n}")
    assert cited > 10 and not missing, missing
