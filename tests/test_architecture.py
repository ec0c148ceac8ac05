"""The import-linter contracts in setup.cfg hold, and they do catch a cycle or an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and the contracts, to break on purpose."""
    for name in ("lm_eval_c3po", "reference_builders"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    return tmp_path


def test_the_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_cycle_between_siblings_breaks_the_build(tree: Path):
    # score.tries -> score.trie_scorer while trie_scorer imports tries: a cycle inside one layer.
    tries = tree / "lm_eval_c3po" / "score" / "tries.py"
    tries.write_text(tries.read_text() + "\nfrom lm_eval_c3po.score import trie_scorer  # noqa: E402,F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "No import cycles between sibling modules" in result.stdout and "BROKEN" in result.stdout


def test_an_upward_import_breaks_the_build(tree: Path):
    specs = tree / "lm_eval_c3po" / "routing" / "specs.py"
    specs.write_text(specs.read_text() + "\nfrom lm_eval_c3po.remix import C3POConfig  # noqa: E402,F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "Data flows one way" in result.stdout and "lm_eval_c3po.routing.specs -> lm_eval_c3po.remix" in result.stdout
