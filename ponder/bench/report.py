"""Results out: side-by-side tables with ratios to ponder, JSON with machine info, PNG plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
from collections import defaultdict

from ponder.bench import REPO_ROOT
from ponder.bench.metrics import RunResult, cdf

BASELINE = "ponder"


# -- machine and JSON -----------------------------------------------------------------------------

def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cpu_flags() -> set[str]:
    """The first processor's feature flags (avx2, avx512_vnni, ...) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return set()
    return set()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict:
    import torch

    return {"cpu_model": cpu_model(), "avx512_vnni": "avx512_vnni" in cpu_flags(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "platform": platform.platform(), "git_commit": git_commit(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def request_rows(run: RunResult) -> list[dict]:
    """Per-request latencies in ms (enough to redraw CDFs from the JSON alone)."""
    ms = lambda v: None if v is None else round(v * 1000.0, 3)  # noqa: E731
    return [{"prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "ttft_ms": ms(r.ttft),
             "tpot_ms": ms(r.tpot), "e2el_ms": ms(r.e2el), "error": r.error} for r in run.records]


def run_to_dict(run: RunResult) -> dict:
    return {"name": run.name, "mode": run.mode, "concurrency": run.concurrency,
            "request_rate": None if math.isinf(run.request_rate) else run.request_rate,
            "workload": run.workload, "duration_s": run.duration_s,
            "metrics": dataclasses.asdict(run.metrics), "engine_counters": run.engine_counters,
            "config": run.config, "requests": request_rows(run)}


def results_document(command: str, runs: list[RunResult], **extra) -> dict:
    return {"command": command, "machine": machine_info(), **extra, "runs": [run_to_dict(r) for r in runs]}


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


# -- tables ---------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def metric_rows(run: RunResult) -> list[tuple[str, float | int | None]]:
    m = run.metrics
    rows = [("completed", m.completed), ("failed", m.failed), ("duration s", m.duration_s),
            ("requests/s", m.request_throughput), ("output tok/s", m.output_throughput),
            ("total tok/s", m.total_throughput)]
    for label, summary in (("TTFT", m.ttft_ms), ("TPOT", m.tpot_ms), ("ITL", m.itl_ms), ("E2EL", m.e2el_ms)):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{label} {stat} ms", getattr(summary, stat) if summary else None))
    if m.goodput is not None:
        rows.append(("goodput req/s", m.goodput))
    for key in ("prefix_cache_hit_rate", "preemptions"):
        if key in run.engine_counters:
            rows.append((key.replace("_", " "), run.engine_counters[key]))
    return rows


def _ratio(value, base) -> str:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return "-"
    return f"{value / base:.2f}x"


def side_by_side(runs: list[RunResult], baseline: str = BASELINE) -> str:
    """One table of runs as columns; each non-baseline column is followed by its ratio to ponder."""
    base = next((r for r in runs if r.name == baseline), None)
    base_rows = dict(metric_rows(base)) if base else {}
    columns = [(r.name, dict(metric_rows(r)), r is not base and base is not None) for r in runs]
    labels = list(dict.fromkeys(label for r in runs for label, _ in metric_rows(r)))
    header = ["metric"]
    for name, _, ratio in columns:
        header += [name] + ([f"{name}/{baseline}"] if ratio else [])
    table = [header]
    for label in labels:
        row = [label]
        for _, values, ratio in columns:
            row.append(_fmt(values.get(label)))
            if ratio:
                row.append(_ratio(values.get(label), base_rows.get(label)))
        table.append(row)
    return format_table(table)


def format_table(table: list[list[str]]) -> str:
    """Rows of cells (the first row the header) as aligned text: first column left, the rest right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tables(runs: list[RunResult]) -> str:
    """Side-by-side tables, one per (mode, workload, concurrency) group of runs."""
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        key = (run.mode, run.workload.get("name"), run.concurrency if run.mode == "serve" else None)
        groups[key].append(run)
    parts = []
    for (mode, workload, conc), group in groups.items():
        title = f"{mode} · {workload}" + (f" · concurrency {conc}" if conc is not None else "")
        parts.append(f"{title}\n{side_by_side(group)}")
    return "\n\n".join(parts)


# -- plots ----------------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, a title, a light grid and a small legend: how every panel here ends."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(plt, fig, path: str, title: str | None = None) -> str:
    """Lay out, write (110 dpi) and close a figure; returns its path."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput_vs_concurrency(runs: list[RunResult], path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_name: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_name[run.name].append(run)
    for name, group in by_name.items():
        group.sort(key=lambda r: r.concurrency)
        ax.plot([r.concurrency for r in group], [r.metrics.output_throughput for r in group], "o-", label=name)
    ax.set_xscale("log", base=2)
    levels = sorted({r.concurrency for r in runs})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(plt, fig, path)


def plot_latency_cdfs(runs: list[RunResult], path: str) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (label, attr) in zip(axes, (("TTFT ms", "ttft"), ("end-to-end latency ms", "e2el"))):
        for run in runs:
            values = [getattr(r, attr) * 1000.0 for r in run.records if r.ok and getattr(r, attr) is not None]
            if values:
                xs, ys = cdf(values)
                ax.step(xs, ys, where="post", label=f"{run.name} c={run.concurrency}")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def write_plots(runs: list[RunResult], json_path: str) -> list[str]:
    """PNGs beside the JSON: <stem>-throughput.png (several concurrencies) and <stem>-latency-cdf.png."""
    stem = os.path.splitext(json_path)[0]
    written = [plot_latency_cdfs(runs, f"{stem}-latency-cdf.png")]
    if len({r.concurrency for r in runs}) > 1:
        written.append(plot_throughput_vs_concurrency(runs, f"{stem}-throughput.png"))
    return written
