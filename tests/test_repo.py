"""The README's set-up commands and the CI script agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_has_the_two_setup_commands() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 2
    main_job, tests = cmds[0], cmds[1]
    assert "torch==2.14.1 torchvision==0.29.1" in main_job and "lagnet train" in main_job
    assert "torch==2.14.1 torchvision==0.29.1" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_exactly() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
    for tool in ("ruff check", "ruff format --check", "mypy --strict lagnet"):
        assert any(line.startswith(tool) for line in ci), tool


def test_pyproject_declares_ranges_not_pins() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.4"' in text and '"torchvision>=0.19"' in text
    assert "==" not in text.split("[project.optional-dependencies]")[0]
