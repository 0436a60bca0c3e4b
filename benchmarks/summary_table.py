"""One markdown table from one comparison run (see benchmarks/run_comparison.sh):

    python benchmarks/summary_table.py OFFLINE.json SERVE.json ROOFLINE.json

Offline-64 rows for every engine, serve rows per engine and concurrency (TTFT p50/p99, TPOT p50,
output tok/s), and the roofline percentages of each run.
"""

from __future__ import annotations

import json
import sys


def _pct(roof: dict, name: str, mode: str, concurrency) -> str:
    for row in roof.get("runs", []):
        if row["name"] == name and row["mode"] == mode and row["concurrency"] == concurrency:
            return f"{row['pct_of_attainable']:.0f}% / {row['pct_of_compute']:.0f}%"
    return "-"


def table(offline: dict, serve: dict, roof: dict) -> str:
    peaks, bounds = roof["peaks"], roof["roofline"]
    lines = [f"Machine: {offline['machine'].get('cpu_model')}, {offline['machine'].get('cpu_cores')} cores, "
             f"torch {offline['machine'].get('torch_version')}, commit {offline['machine'].get('git_commit', '')[:8]}; "
             f"{peaks['bandwidth_gbs']:.1f} GB/s, {peaks['matmul_gflops']:.0f} GFLOP/s fp32. "
             f"Bounds: {bounds['bandwidth_tok_s']:.0f} tok/s per sequence (bandwidth), "
             f"{bounds['compute_tok_s']:.0f} tok/s (compute).", "",
             "| run | engine | concurrency | total tok/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
             "| failed | roofline (attainable / compute) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for result, kind in ((offline, "offline-64"), (serve, "serve")):
        for run in result["runs"]:
            m = run["metrics"]
            # offline: against the first engine (ponder); serve: against the first engine at this concurrency
            key = kind if kind == "offline-64" else (kind, run["concurrency"])
            base.setdefault(key, m["output_throughput"])
            ratio = m["output_throughput"] / base[key] if base[key] else 0
            lines.append(f"| {kind} | {run['name']} | {run['concurrency']} | {m['total_throughput']:.1f} | "
                         f"{m['output_throughput']:.1f} ({ratio:.2f}x) | {m['ttft_ms']['p50']:.0f} | "
                         f"{m['ttft_ms']['p99']:.0f} | {m['tpot_ms']['p50']:.1f} | {m['failed']} | "
                         f"{_pct(roof, run['name'], run['mode'], run['concurrency'])} |")
    lines.append("")
    lines.append("Ratios in parentheses: output tok/s relative to ponder (offline: ponder's run; serve: "
                 "ponder at the same concurrency).")
    return "\n".join(lines)


if __name__ == "__main__":
    paths = sys.argv[1:4]
    docs = [json.load(open(p)) for p in paths]
    print(table(*docs))
