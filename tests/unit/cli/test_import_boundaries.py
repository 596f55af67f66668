"""What the CLI and the validate node load at import time: no torch; the client depends on no server package.

Which modules may import which is checked statically by import-linter (`make lint`, the contracts in
pyproject.toml, tested in tests/unit/test_layer_contracts.py), the client's imports included. What is
left here is what a static graph cannot tell: which packages importing a module actually loads,
since the server commands import the data plane inside functions on purpose.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA_PLANE = ("worker", "torch", "transformers", "peft", "bitsandbytes", "accelerate")

# Imports every module of a package in a fresh interpreter that refuses the blocked top-level names.
PROBE = """
import importlib, pkgutil, sys
blocked = set(sys.argv[2].split(","))
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, Refuse())
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
"""


def test_every_cli_module_imports_without_the_data_plane() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "app.cli", ",".join(DATA_PLANE)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# What `tuneforge worker --queues validate` loads: it runs from the API image, which has no torch.
VALIDATE_NODE_PROBE = """
import sys
blocked = set(sys.argv[1].split(","))
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, Refuse())
import worker.main, worker.validate_task, worker.celery_app
from app.cli import build_parser
args = build_parser().parse_args(["worker", "--queues", "validate"])
assert args.queues == ("validate",)
"""


def test_the_validate_worker_node_imports_nothing_of_the_training_stack() -> None:
    training_stack = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "gguf")
    result = subprocess.run(
        [sys.executable, "-c", VALIDATE_NODE_PROBE, ",".join(training_stack)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_client_distribution_depends_on_httpx_pydantic_and_tqdm_only() -> None:
    project = tomllib.loads((REPO_ROOT / "client" / "pyproject.toml").read_text())["project"]
    names = {spec.split(">")[0].split("=")[0].split("[")[0].strip() for spec in project["dependencies"]}
    assert names == {"httpx", "pydantic", "tqdm"}
