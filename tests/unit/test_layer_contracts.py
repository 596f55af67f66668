"""The layer contracts `make lint` checks: each breaks when a module takes an import it forbids.

`make lint` proves the tree keeps the contracts; these tests prove the contracts can fail, so that
a contract weakened by a typo (a module name that matches nothing, a dropped package) shows up.
Each test adds a module to a copy of the source tree and runs `lint-imports` on the copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "app": REPO_ROOT / "app",
    "worker": REPO_ROOT / "worker",
    "tuneforge": REPO_ROOT / "client" / "tuneforge",
}
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The three root packages side by side, with the repository's contracts."""
    for name, source in PACKAGES.items():
        shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def lint_contract(tree: Path, contract: str) -> str:
    """`lint-imports` for one contract on the copy, its output in one line per finding."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "400"}
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "--contract", contract, "pyproject.toml"],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.stdout


def add_module(tree: Path, module: str, source: str) -> None:
    (tree / Path(*module.split("."))).with_suffix(".py").write_text(f'"""Probe."""\n\n{source}\n')


@pytest.mark.parametrize(
    ("contract", "importer", "imported"),
    [
        ("control-plane", "app.services.layer_probe", "worker.tasks"),
        ("control-plane", "app.services.layer_probe", "torch"),
        ("libraries-without-app", "worker.training.layer_probe", "app.settings"),
        ("libraries-without-app", "worker.serving.layer_probe", "app.db"),
        ("libraries-without-glue", "worker.training.layer_probe", "worker.tasks"),
        ("libraries-without-glue", "worker.serving.layer_probe", "sqlalchemy"),
        ("training-apart-from-serving", "worker.serving.layer_probe", "worker.training.config"),
        ("training-apart-from-serving", "worker.training.layer_probe", "worker.serving.params"),
        ("client-without-server", "tuneforge.layer_probe", "app.settings"),
        ("client-without-server", "tuneforge.layer_probe", "fastapi"),
        ("client-without-server", "tuneforge.layer_probe", "torch"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree: Path, contract: str, importer: str, imported: str
) -> None:
    add_module(tree, importer, f"import {imported}")

    output = lint_contract(tree, contract)

    assert "BROKEN" in output
    assert f"{importer} -> {imported} (l.3)" in output


@pytest.mark.parametrize("package", ["app", "worker.serving", "worker.training", "tuneforge"])
def test_two_modules_importing_each_other_break_the_no_cycles_contract(tree: Path, package: str) -> None:
    add_module(tree, f"{package}.cycle_probe_a", f"from {package} import cycle_probe_b")
    add_module(tree, f"{package}.cycle_probe_b", f"from {package} import cycle_probe_a")

    output = lint_contract(tree, "no-cycles")

    assert f"No cycles are allowed in {package}.\n" in output
    assert ".cycle_probe_a -> .cycle_probe_b" in output or ".cycle_probe_b -> .cycle_probe_a" in output
