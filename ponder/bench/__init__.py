"""Benchmarks: workloads, metrics, an HTTP client, peers (llama.cpp, transformers), reports.

`ponder bench --help` lists the commands; docs/benchmarks.md says what each measures and how.
"""

import os

# The checkout holding this package: the peers' binaries (.peers/bin), data paths and the git commit.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
