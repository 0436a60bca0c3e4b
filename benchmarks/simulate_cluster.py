"""Simulated cluster experiments for issue 15: routing policies on a shared-prefix trace, and P/D split
vs colocated replicas at rising load. Pure simulation (ponder/distributed/simulate.py), every step
priced by the per-step cost model fitted from ponder's own step timings:

    ponder bench costmodel --per-step --output benchmarks/results/step-costmodel-smollm2-135m.json
    python benchmarks/simulate_cluster.py          # JSON + PNG under benchmarks/results/
    # the same experiments priced by the models written on paper (docs/distributed.md)
    python benchmarks/simulate_cluster.py --tag=-roofline \
        --cost-model benchmarks/results/step-costmodel-roofline-smollm2-135m.json
    python benchmarks/simulate_cluster.py --tag=-whatif-cheap-decode \
        --cost-model benchmarks/results/step-costmodel-whatif-cheap-decode.json

(a) routing: 16 system prompts of 64 blocks, Poisson arrivals; goodput vs replicas 1..8 for
    prefix-aware, round-robin and least-loaded. Each replica's KV pool holds about ten of the system
    prompts besides its running requests, so which replica a prompt goes to decides whether it hits.
(b) P/D: long prompts (1-2k tokens, 64-128 out) and short prompts (64-256 in, 128-256 out); goodput vs
    arrival rate for 4 replicas colocated vs split 1P+3D, 2P+2D, 3P+1D, under a strict and a loose
    TPOT SLO; and goodput vs replicas (2..8) at one rate, colocated vs the best split.
Every assumption is written into the JSON ("assumptions") and docs/distributed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from ponder.bench.costmodel import StepCostModel, attention_reads
from ponder.bench.report import pyplot, save_figure
from ponder.distributed.request_traces import random_trace, shared_prefix_trace
from ponder.distributed.simulate import SLO, ClusterSpec, simulate
from ponder.distributed.simulated_replica import ReplicaSpec

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_COST_MODEL = os.path.join(HERE, "results", "step-costmodel-smollm2-135m.json")
# (label, policy, the router's balance_tokens): the default, and prefix-aware with a looser balance
# (the default 2048 tokens is under two of these requests, so a busy holder gives its prefix away)
ROUTINGS = (("prefix-aware", "prefix-aware", 2048), ("prefix-aware, balance 16k", "prefix-aware", 16384),
            ("round-robin", "round-robin", 2048), ("least-loaded", "least-loaded", 2048))

# (a) routing
ROUTING_TRACE = dict(num_requests=600, num_prefixes=16, prefix_len=1024, suffix_len=(32, 128), output_len=(32, 96))
ROUTING_REPLICA = ReplicaSpec(max_batched_tokens=512, max_seqs=32, num_blocks=1024, block_size=16)
ROUTING_REPLICAS = range(1, 9)

# (b) P/D
PD_TRACES = {"long prompts": dict(prompt_len=(1024, 2048), output_len=(64, 128)),
             "balanced": dict(prompt_len=(512, 1024), output_len=(256, 512)),
             "short prompts": dict(prompt_len=(64, 256), output_len=(128, 256))}
PD_REQUESTS = 400
PD_REPLICA = ReplicaSpec(max_batched_tokens=512, max_seqs=32, num_blocks=8192, block_size=16)
PD_PREFILL_REPLICA = ReplicaSpec(max_batched_tokens=2048, max_seqs=32, num_blocks=8192, block_size=16)
PD_TOTAL = 4
PD_RATE_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.2)   # of the colocated cluster's capacity
PD_SCALE_REPLICAS = (2, 4, 6, 8)
PD_SCALE_LOAD = 0.8                 # arrival rate: this fraction of N colocated replicas' capacity


# -- what the cost model says a step, a prefill, a replica take ------------------------------------

def _mean(bounds: tuple[int, int]) -> float:
    return sum(bounds) / 2


def prefill_s(cost: StepCostModel, prompt: int, budget: int) -> float:
    """An unloaded replica's time to prefill `prompt` tokens in chunks of `budget`."""
    return sum(cost.predict(prompt_tokens=min(budget, prompt - start),
                            context_tokens=attention_reads(start, min(budget, prompt - start)),
                            prefill_context_tokens=attention_reads(start, min(budget, prompt - start)))
               for start in range(0, prompt, budget))


def decode_step_s(cost: StepCostModel, rows: int, context: float) -> float:
    return cost.predict(decode_rows=rows, context_tokens=rows * context)


def mixed_step_s(cost: StepCostModel, budget: int, rows: int, context: float) -> float:
    """A step carrying a full prefill chunk (at position `context`) and `rows` decode rows."""
    chunk = budget - rows
    reads = attention_reads(int(context), chunk)
    return cost.predict(prompt_tokens=chunk, decode_rows=rows, context_tokens=reads + rows * context,
                        prefill_context_tokens=reads)


def capacity_rps(cost: StepCostModel, prompt: float, output: float, replicas: int, batch: int = 32) -> float:
    """Rough requests/s `replicas` colocated replicas sustain: each request's prefill once, then its
    decode rows in full batches."""
    decode = output * decode_step_s(cost, batch, prompt + output / 2) / batch
    return replicas / (prefill_s(cost, int(prompt), 512) + decode)


def scaled_slos(cost: StepCostModel, prompt: float, output: float, budget: int, rows: int = 32) -> dict[str, SLO]:
    """SLOs in the cost model's own time scale (so they keep their meaning when it is refitted):
    TTFT within 3x an unloaded prefill of the mean prompt; a strict TPOT of 2x a decode-only step of
    `rows` rows (decodes must rarely share a step with a prefill chunk) and a loose one of half a
    step carrying a full prefill chunk (they may, every other step)."""
    context = prompt + output / 2
    ttft = 3 * prefill_s(cost, int(prompt), budget)
    return {"strict TPOT": SLO(ttft, 2 * decode_step_s(cost, rows, context)),
            "loose TPOT": SLO(ttft, 0.5 * mixed_step_s(cost, budget, rows, context))}


def _metrics(trace, spec: ClusterSpec, cost, named_slos: dict[str, SLO]) -> dict:
    result = simulate(trace, spec, cost)
    return {name: result.metrics(slo) for name, slo in named_slos.items()}


def routing_experiment(cost: StepCostModel, seed: int) -> dict:
    """Goodput vs replicas per policy. The arrival rate is what 2 replicas would sustain if every
    system prompt were a cache hit; the TTFT SLO is 2x an unloaded cold prefill of a whole prompt
    (a request may pay its system prompt once, not queue behind others paying theirs)."""
    t = ROUTING_TRACE
    prompt = t["prefix_len"] + _mean(t["suffix_len"])
    hit_rate = capacity_rps(cost, _mean(t["suffix_len"]), _mean(t["output_len"]), 2)
    slo = SLO(2 * prefill_s(cost, int(prompt), ROUTING_REPLICA.max_batched_tokens),
              scaled_slos(cost, prompt, _mean(t["output_len"]), ROUTING_REPLICA.max_batched_tokens)["loose TPOT"].tpot_s)
    trace = shared_prefix_trace(rate=hit_rate, seed=seed, **t)
    runs = []
    for n in ROUTING_REPLICAS:
        for label, policy, balance in ROUTINGS:
            spec = ClusterSpec(replicas=n, policy=policy, replica=ROUTING_REPLICA, balance_tokens=balance)
            m = _metrics(trace, spec, cost, {"slo": slo})["slo"]
            runs.append({"replicas": n, "routing": label, "balance_tokens": balance, **m})
            print(f"routing {label:>25} x{n}: goodput {m['goodput_rps']:.3f} rps "
                  f"({100 * m['slo_attainment']:.0f}% in SLO), prompt tokens computed {m['prompt_tokens_computed']}",
                  file=sys.stderr)
    return {"arrival_rate_rps": hit_rate, "trace": t, "replica": dataclasses.asdict(ROUTING_REPLICA),
            "slo": dataclasses.asdict(slo), "runs": runs}


def _pd_specs(total: int) -> list[ClusterSpec]:
    colocated = ClusterSpec(replicas=total, replica=PD_REPLICA)
    return [colocated] + [ClusterSpec(prefill_replicas=p, decode_replicas=total - p, replica=PD_REPLICA,
                                      prefill_replica=PD_PREFILL_REPLICA) for p in range(1, total)]


def pd_experiment(cost: StepCostModel, seed: int) -> dict:
    out = {}
    for name, shape in PD_TRACES.items():
        prompt, output = _mean(shape["prompt_len"]), _mean(shape["output_len"])
        trace_slos = scaled_slos(cost, prompt, output, PD_REPLICA.max_batched_tokens)
        capacity = capacity_rps(cost, prompt, output, PD_TOTAL)
        by_rate = []
        for fraction in PD_RATE_FRACTIONS:
            trace = random_trace(PD_REQUESTS, fraction * capacity, seed=seed, **shape)
            by_rate += [{"arrival_rate_rps": fraction * capacity, "load": fraction,
                         "metrics": _metrics(trace, spec, cost, trace_slos)} for spec in _pd_specs(PD_TOTAL)]
        by_replicas = []
        for n in PD_SCALE_REPLICAS:
            rate = PD_SCALE_LOAD * capacity_rps(cost, prompt, output, n)
            trace = random_trace(PD_REQUESTS, rate, seed=seed, **shape)
            by_replicas += [{"replicas": n, "arrival_rate_rps": rate, "metrics": _metrics(trace, spec, cost, trace_slos)}
                            for spec in _pd_specs(n)]
        out[name] = {"trace": shape, "slos": {k: dataclasses.asdict(v) for k, v in trace_slos.items()},
                     "capacity_rps": capacity, "by_rate": by_rate, "scale_load": PD_SCALE_LOAD,
                     "by_replicas": by_replicas}
        print(f"P/D {name}: done", file=sys.stderr)
    return {"requests": PD_REQUESTS, "total_replicas": PD_TOTAL, "replica": dataclasses.asdict(PD_REPLICA),
            "prefill_replica": dataclasses.asdict(PD_PREFILL_REPLICA), "traces": out}


def assumptions(cost: StepCostModel, cost_path: str) -> dict:
    with open(cost_path) as f:
        fitted = json.load(f)
    spec = ClusterSpec()
    return {"cost_model": {"source": os.path.relpath(cost_path, os.path.dirname(HERE)), "form": fitted.get("form"),
                           "coefficients": dataclasses.asdict(cost), "model": fitted.get("model"),
                           "note": fitted.get("note"), "machine": fitted.get("machine", {}).get("cpu_model")},
            "kv_handoff": {"bytes_per_token": spec.kv_bytes_per_token, "gb_per_s": spec.handoff_gbs,
                           "fixed_latency_s": spec.handoff_latency_s,
                           "why": "Ray object store as numpy measured 3-4 GB/s on this machine (RAY.md); one "
                                  "hand-off at a time per prefill replica; the first token reaches the "
                                  "client with the KV"},
            "replica": "continuous batching under a token budget, chunked prefill, running first then FCFS "
                       "admission; admission reserves prompt + output KV (no preemption); freed prompt blocks "
                       "stay cached (LRU); a waiting request whose next block is being computed waits for it",
            "router": "ponder.distributed.router.Router (prefix_blocks=8, balance_tokens=2048, balance_ratio=2); "
                      "P/D decode replicas chosen least-loaded",
            "goodput": "requests meeting both the TTFT and the TPOT SLO, per second from the first arrival to "
                       "the last finish; TPOT = (finish - first token) / (output tokens - 1)"}


# -- plots -------------------------------------------------------------------------------------------

def _figure(rows: int, cols: int):
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    return plt, fig, axes


def plot_routing(doc: dict, out_dir: str, tag: str = "") -> str:
    plt, fig, (row,) = _figure(1, 2)
    exp = doc["routing"]
    for label, _, _ in ROUTINGS:
        runs = [r for r in exp["runs"] if r["routing"] == label]
        xs = [r["replicas"] for r in runs]
        row[0].plot(xs, [r["goodput_rps"] for r in runs], marker="o", label=label)
        row[1].plot(xs, [r["prompt_tokens_computed"] / r["prompt_tokens"] for r in runs], marker="o", label=label)
    row[0].axhline(exp["arrival_rate_rps"], color="grey", linestyle=":", label="arrival rate")
    row[0].set(xlabel="replicas", ylabel="goodput (requests/s in SLO)")
    row[1].set(xlabel="replicas", ylabel="prompt tokens computed / prompt tokens", ylim=(0, None))
    for ax in row:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    slo = exp["slo"]
    return save_figure(plt, fig, os.path.join(out_dir, f"simulate-routing{tag}.png"),
                       f"simulated routing: {exp['trace']['num_prefixes']} system prompts of "
                       f"{exp['trace']['prefix_len']} tokens, {exp['arrival_rate_rps']:.2f} req/s Poisson; "
                       f"SLO TTFT <= {slo['ttft_s']:.2f} s, TPOT <= {slo['tpot_s']:.3f} s")


def _pd_figure(doc: dict, draw):
    """The P/D plots' grid: one panel per (trace, SLO), drawn by `draw(ax, trace name, experiment,
    SLO name)`, which returns the panel's title; each panel then gets the same styling."""
    traces = doc["pd"]["traces"]
    slo_names = list(next(iter(traces.values()))["slos"])
    plt, fig, axes = _figure(len(traces), len(slo_names))
    for row, (trace_name, exp) in zip(axes, traces.items()):
        for ax, slo_name in zip(row, slo_names):
            ax.set_title(draw(ax, trace_name, exp, slo_name), fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return plt, fig


def plot_pd_rate(doc: dict, out_dir: str, tag: str = "") -> str:
    def draw(ax, trace_name, exp, slo_name):
        for cluster in dict.fromkeys(r["metrics"][slo_name]["cluster"] for r in exp["by_rate"]):
            runs = [r for r in exp["by_rate"] if r["metrics"][slo_name]["cluster"] == cluster]
            ax.plot([r["arrival_rate_rps"] for r in runs], [r["metrics"][slo_name]["goodput_rps"] for r in runs],
                    marker="o", label=cluster, linestyle="-" if "colocated" in cluster else "--")
        ax.set(xlabel="arrival rate (requests/s)", ylabel="goodput (requests/s in SLO)")
        slo = exp["slos"][slo_name]
        return f"{trace_name}, {slo_name} (TTFT <= {slo['ttft_s']:.2f} s, TPOT <= {slo['tpot_s']:.3f} s)"

    plt, fig = _pd_figure(doc, draw)
    return save_figure(plt, fig, os.path.join(out_dir, f"simulate-pd-rate{tag}.png"),
                       f"simulated P/D split vs colocated, {PD_TOTAL} replicas, rising load")


def plot_pd_replicas(doc: dict, out_dir: str, tag: str = "") -> str:
    def draw(ax, trace_name, exp, slo_name):
        colocated, best = [], []
        for n in PD_SCALE_REPLICAS:
            runs = [r["metrics"][slo_name] for r in exp["by_replicas"] if r["replicas"] == n]
            colocated.append(next(m for m in runs if "colocated" in m["cluster"]))
            best.append(max((m for m in runs if "colocated" not in m["cluster"]), key=lambda m: m["goodput_rps"]))
        ax.plot(PD_SCALE_REPLICAS, [m["goodput_rps"] for m in colocated], marker="o", label="colocated")
        ax.plot(PD_SCALE_REPLICAS, [m["goodput_rps"] for m in best], marker="s", linestyle="--",
                label="best P/D split")
        for n, m in zip(PD_SCALE_REPLICAS, best):
            ax.annotate(m["cluster"], (n, m["goodput_rps"]), fontsize=7, textcoords="offset points", xytext=(3, -10))
        rates = [next(r["arrival_rate_rps"] for r in exp["by_replicas"] if r["replicas"] == n)
                 for n in PD_SCALE_REPLICAS]
        ax.plot(PD_SCALE_REPLICAS, rates, color="grey", linestyle=":", label="arrival rate")
        ax.set(xlabel="replicas (total)", ylabel="goodput (requests/s in SLO)")
        return f"{trace_name}, {slo_name}"

    plt, fig = _pd_figure(doc, draw)
    return save_figure(plt, fig, os.path.join(out_dir, f"simulate-pd-replicas{tag}.png"),
                       f"simulated goodput vs replicas, arrivals at {PD_SCALE_LOAD:.0%} of N colocated replicas' "
                       "capacity: colocated vs the best P/D split")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-model", default=DEFAULT_COST_MODEL, help="results JSON of bench costmodel --per-step")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files (simulate-cluster<TAG>.json ...)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    cost = StepCostModel.load(args.cost_model)
    print(cost.describe(), file=sys.stderr)
    t = time.perf_counter()
    doc = {"assumptions": assumptions(cost, args.cost_model), "seed": args.seed,
           "routing": routing_experiment(cost, args.seed), "pd": pd_experiment(cost, args.seed)}
    doc["simulation_wall_s"] = time.perf_counter() - t
    path = os.path.join(args.output_dir, f"simulate-cluster{args.tag}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"results: {path}", file=sys.stderr)
    if not args.no_plots:
        for p in (plot_routing(doc, args.output_dir, args.tag), plot_pd_rate(doc, args.output_dir, args.tag),
                  plot_pd_replicas(doc, args.output_dir, args.tag)):
            print(f"plot: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
