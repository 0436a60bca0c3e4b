#!/usr/bin/env bash
# The side-by-side comparison of the bench issue, in one run on an otherwise idle machine:
# offline-64 (ponder, transformers, llama.cpp), serve at concurrency 1/16/64 (ponder, llama.cpp),
# the roofline over both, and one markdown table of it all. Needs `make peers` for llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/comparison}
mkdir -p "$(dirname "$out")"
ponder=${PONDER:-.venv/bin/ponder}
$ponder bench throughput --workload offline-64 --peer hf --peer llama.cpp --no-progress --output "$out-offline64.json"
$ponder bench serve --peer ponder --peer llama.cpp --concurrency 1,16,64 --no-progress --output "$out-serve.json"
$ponder bench roofline --results "$out-offline64.json" --results "$out-serve.json" --output "$out-roofline.json"
.venv/bin/python benchmarks/summary_table.py "$out-offline64.json" "$out-serve.json" "$out-roofline.json" | tee "$out.md"
