"""The README's Failure behaviour table and the tests marked `failure_case` name the same cases."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases_in_tests() -> dict[str, list[str]]:
    """Case name -> tests that check it, read from the `failure_case(...)` marks."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "failure_case":
                for arg in node.args:
                    found.setdefault(arg.value, []).append(path.name)
    return found


def cases_in_readme() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Failure behaviour\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    return [re.sub(r"\s+", " ", row.split("|")[1]).strip() for row in rows]


def test_every_case_in_the_readme_has_a_test_and_every_tested_case_is_in_the_readme():
    listed, tested = cases_in_readme(), cases_in_tests()
    assert len(listed) == len(set(listed)), "a case is listed twice"
    assert sorted(set(listed) - set(tested)) == [], "listed in the README but checked by no test"
    assert sorted(set(tested) - set(listed)) == [], "checked by a test but missing from the README table"
    assert len(listed) >= 50
