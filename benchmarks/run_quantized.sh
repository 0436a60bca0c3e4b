#!/usr/bin/env bash
# The quantized-execution issue's figures, in one run on an otherwise idle machine, against llama.cpp
# built by `make peers`: single-stream pp512/tg128 (ponder native vs llama-bench, and ponder's fp32
# path for the prefill ratio) on SmolLM2, Qwen2.5-Coder 0.5B and 1.5B; offline-64 and serve at
# concurrency 16 on the default model (ponder vs llama.cpp). Needs `make models` and the 1.5B wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/quantized}
mkdir -p "$(dirname "$out")"
ponder=${PONDER:-.venv/bin/ponder}
for model in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct; do
    $ponder bench single-stream --model "$model" --peer llama.cpp --output "$out-single-$model.json"
done
# ponder's fp32 path, the reference for the prefill ratio (the 1.5B would need about 14 GB in fp32)
for model in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
    $ponder bench single-stream --model "$model" --weights fp32 --kv-cache-dtype fp32 --tg 16 \
        --output "$out-single-$model-fp32.json"
done
$ponder bench throughput --workload offline-64 --peer llama.cpp --no-progress --output "$out-offline64.json"
$ponder bench serve --peer ponder --peer llama.cpp --concurrency 16 --no-progress --output "$out-serve16.json"
