"""The house's arrows (pyproject.toml's [tool.importlinter] contracts), checked with import-linter:
they hold for the code as it is, and a deliberately wrong import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs import-linter on the `ponder` found under argv[1] (not the editable install's).
_LINT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, sys.argv[1])
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename=sys.argv[1] + "/pyproject.toml"))
"""


def _lint(root: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LINT, root], capture_output=True, text=True, cwd=root)


def test_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_a_wrong_import_breaks_them(tmp_path):
    shutil.copytree(os.path.join(ROOT, "ponder"), tmp_path / "ponder",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    scheduler = tmp_path / "ponder" / "engine" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\nimport ponder.server.app  # the engine must not know the server\n")
    layers = tmp_path / "ponder" / "layers" / "norm.py"
    layers.write_text(layers.read_text() + "\nimport ponder.model.loader  # layers are below the model\n")
    app = tmp_path / "ponder" / "server" / "app.py"
    app.write_text(app.read_text() + "\nimport ray  # one engine is served without Ray\n")
    run = _lint(str(tmp_path))
    assert run.returncode != 0
    assert "ponder.engine is not allowed to import ponder.server" in run.stdout
    assert "ponder.layers is not allowed to import ponder.model" in run.stdout
    assert "ponder.server is not allowed to import ray" in run.stdout
