"""One engine needs no Ray: serving without --replicas imports neither ray nor ponder.distributed."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHECK = """
import sys
import ponder.server.app, ponder.server.launch, ponder.cli
ponder.cli.build_parser().parse_args(["serve", "--port", "1"])
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "ponder.distributed")))
print(loaded)
sys.exit(1 if loaded else 0)
"""


def test_the_server_imports_no_ray():
    run = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout + run.stderr
