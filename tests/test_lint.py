"""``ruff check`` and ``ruff format --check`` of the whole repository are clean (``[tool.ruff]`` in pyproject.toml).

Fix findings with ``ruff check --fix .`` and ``ruff format .`` (ruff comes with the test extra).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('command', [['check', '--output-format', 'concise'], ['format', '--check']])
def test_ruff_is_clean(command):
    result = subprocess.run(
        [sys.executable, '-m', 'ruff', *command, '--no-cache', '.'],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(
            f'ruff {" ".join(command)} exited {result.returncode} (ruff comes with the test extra: '
            f'pip install -e ".[test]")\n{result.stdout}{result.stderr}',
            pytrace=False,
        )
