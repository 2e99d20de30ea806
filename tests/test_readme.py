"""The README's two commands are exactly what CI runs (a newcomer's set-up is what CI proves)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and test", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_setup_and_test_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    setup, test = cmds
    assert "python3 -m venv .venv" in setup and "torch==2.13.0" in setup and '".[test]"' in setup
    assert "chromium" in setup
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_commands():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    for cmd in _readme_commands():
        assert cmd in ci_lines, f"README command not run verbatim by .ci/run: {cmd}"
