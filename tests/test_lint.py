"""``ruff check`` of the whole repository is clean (rules: ``[tool.ruff]`` in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format', 'concise', '.'],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f'ruff check exited {result.returncode} (ruff comes with the test extra: pip install -e ".[test]")'
                    f'\n{result.stdout}{result.stderr}', pytrace=False)
