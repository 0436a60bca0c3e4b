"""`ponder bench ...`: throughput (offline), serve (online), single-stream, roofline, tune (and costmodel,
think, humaneval, each from its own module).

Each command builds a workload, runs ponder and the asked-for peers one after another (never two at
once: they would share the CPU), prints side-by-side tables and writes JSON (+ PNG plots) if asked.
Heavy imports happen inside the commands so `ponder --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ponder.bench.workloads import DEFAULT_GSM8K_PATH, WORKLOAD_KINDS, WorkloadSpec, int_list

OFFLINE_PEERS = ("hf", "llama.cpp")
SERVE_PEERS = ("ponder", "llama.cpp")
SINGLE_STREAM_PEERS = ("llama.cpp",)


# -- arguments --------------------------------------------------------------------------------------

def _workload_args(p: argparse.ArgumentParser, kind: str, num_requests: int | None, input_len: str,
                   output_len: int) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOAD_KINDS, default=kind,
                   help="random: random tokens; offline-64: 64 requests, 64-256 in, 128 out; gsm8k: questions "
                        "with the chat template; shared-prefix: K groups sharing a long prefix")
    g.add_argument("--num-requests", type=int, default=num_requests)
    g.add_argument("--input-len", default=input_len, help="prompt tokens: N or LOW:HIGH (random); "
                                                          "suffix tokens (shared-prefix)")
    g.add_argument("--output-len", type=int, default=output_len)
    g.add_argument("--respect-eos", action="store_true", help="stop at EOS (default: ignore it, fixed lengths)")
    g.add_argument("--dataset-path", default=DEFAULT_GSM8K_PATH, help="GSM8K jsonl (gsm8k workload)")
    g.add_argument("--num-groups", type=int, default=4, help="shared-prefix: groups sharing a prefix")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens per group")
    g.add_argument("--seed", type=int, default=0)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (keys: ttft, tpot, e2el)")
    p.add_argument("--output", default=None, help="results JSON path (plots are written beside it)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` and its commands to the `ponder` command's subparsers."""
    from ponder.bench import costmodel_command, humaneval, think_eval
    from ponder.config import add_engine_arguments

    bench = sub.add_parser("bench", help="benchmarks: offline, online, single stream, roofline, tuning, cost model")
    cmds = bench.add_subparsers(dest="bench_command", required=True)

    tp = cmds.add_parser("throughput", help="offline throughput, in-process, with peers side by side")
    add_engine_arguments(tp)
    _workload_args(tp, "offline-64", 64, "64:256", 128)
    tp.add_argument("--peer", action="append", default=[], choices=OFFLINE_PEERS,
                    help="also run a peer on the same GGUF (repeatable): hf, llama.cpp")
    _output_args(tp)
    tp.set_defaults(bench_func=cmd_throughput)

    sv = cmds.add_parser("serve", help="online serving over HTTP against OpenAI-compatible servers")
    sv.add_argument("--model", default=None, help="model for started servers and the tokenizer")
    sv.add_argument("--peer", action="append", default=[], choices=SERVE_PEERS,
                    help="start a server and measure it (repeatable): ponder, llama.cpp")
    sv.add_argument("--base-url", action="append", default=[], metavar="[NAME=]URL",
                    help="measure a running OpenAI-compatible server (repeatable)")
    sv.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 64],
                    help="most requests in flight; a comma list sweeps (default 1,4,16,64)")
    sv.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals per second (default inf: all at once, gated by concurrency)")
    sv.add_argument("--ponder-args", default="", help="more `ponder serve` options for --peer ponder")
    _workload_args(sv, "random", None, "128", 128)
    _output_args(sv)
    sv.set_defaults(bench_func=cmd_serve)

    ss = cmds.add_parser("single-stream", help="llama-bench-like pp/tg tok/s at batch 1, greedy, "
                                               "prefix cache off; --peer llama.cpp runs llama-bench")
    add_engine_arguments(ss)
    ss.set_defaults(max_num_seqs=1)
    ss.add_argument("--pp", type=int, default=512, help="prompt tokens of the pp test (0: skip it)")
    ss.add_argument("--tg", type=int, default=128, help="generated tokens of the tg test (0: skip it)")
    ss.add_argument("-r", "--repetitions", type=int, default=3, help="runs of each test (distinct prompts)")
    ss.add_argument("--seed", type=int, default=0)
    ss.add_argument("--peer", action="append", default=[], choices=SINGLE_STREAM_PEERS,
                    help="also run llama.cpp's llama-bench on the same GGUF")
    ss.add_argument("--output", default=None, help="results JSON path")
    ss.set_defaults(bench_func=cmd_single_stream)

    rf = cmds.add_parser("roofline", help="memory bandwidth, matmul FLOP/s and the model's bounds")
    rf.add_argument("--model", default=None)
    rf.add_argument("--results", action="append", default=[], help="results JSON to rate against the bounds")
    rf.add_argument("--bandwidth-mb", type=int, default=256)
    rf.add_argument("--matmul-size", type=int, default=1024)
    rf.add_argument("--output", default=None)
    rf.set_defaults(bench_func=cmd_roofline)

    tu = cmds.add_parser("tune", help="search max_num_batched_tokens x max_num_seqs for a workload")
    add_engine_arguments(tu)
    _workload_args(tu, "offline-64", 64, "64:256", 128)
    tu.add_argument("--batched-tokens-grid", type=int_list, default=[256, 512, 1024, 2048])
    tu.add_argument("--num-seqs-grid", type=int_list, default=[16, 32, 64])
    _output_args(tu)
    tu.set_defaults(bench_func=cmd_tune)

    for evaluation in (costmodel_command, think_eval, humaneval):
        add_engine_arguments(evaluation.add_parser(cmds))
    return bench


def run(args) -> int:
    return args.bench_func(args)


# -- shared helpers ---------------------------------------------------------------------------------

def _cache_dir() -> str:
    from ponder.config import EngineConfig

    return EngineConfig().cache_dir


def _spec(args, num_requests: int | None = None) -> WorkloadSpec:
    return WorkloadSpec(kind=args.workload, num_requests=num_requests or args.num_requests or 16,
                        input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                        dataset_path=args.dataset_path, num_groups=args.num_groups, prefix_len=args.prefix_len,
                        ignore_eos=not args.respect_eos)


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _slos(args) -> dict[str, float]:
    from ponder.bench.metrics import parse_slos

    return parse_slos(args.goodput)


def _finish(args, command: str, runs, show_tables: bool = True, **extra) -> None:
    """Print the tables; write the JSON and the plots if --output was given."""
    from ponder.bench import report

    if show_tables:
        print(report.tables(runs))
    if not args.output:
        return
    report.write_json(args.output, report.results_document(command, runs, **extra))
    print(f"\nresults: {args.output}")
    if args.no_plots or not runs:
        return
    try:
        for path in report.write_plots(runs, args.output):
            print(f"plot: {path}")
    except ModuleNotFoundError as e:
        print(f"no plots ({e.name} is not installed: pip install 'ponder[bench]')", file=sys.stderr)


# -- commands ---------------------------------------------------------------------------------------

def cmd_throughput(args) -> int:
    from ponder.bench import offline
    from ponder.config import engine_options
    from ponder.model.loader import load_model, resolve_model_path

    cache_dir, slos = _cache_dir(), _slos(args)
    loaded = load_model(args.model, cache_dir)
    workload = _spec(args).build(loaded.tokenizer, loaded.config.vocab_size)
    print(f"workload {workload.name}: {len(workload.prompts)} requests, {workload.prompt_tokens} prompt tokens, "
          f"{workload.output_len} out each", file=sys.stderr)
    runs = [offline.run_ponder(workload, loaded, engine_options(args), _progress(args), slos)]
    model_path = resolve_model_path(args.model, cache_dir)
    for peer in dict.fromkeys(args.peer):
        if peer == "hf":
            runs.append(offline.run_hf(workload, model_path, cache_dir, _progress(args), slos))
        else:
            runs.append(offline.run_llamacpp(workload, model_path, _progress(args), slos))
    _finish(args, "throughput", runs, model=model_path, goodput_slos=slos)
    return 0


def _serve_endpoints(args, largest) -> list[tuple[str, object]]:
    """(name, factory) per --peer and --base-url; a factory gives a context manager whose value has a
    `base_url` (a started server, stopped on exit, or a running endpoint left alone)."""
    from contextlib import nullcontext

    from ponder.bench import peers
    from ponder.bench.client import Target
    from ponder.model.loader import resolve_model_path

    out = []
    for peer in dict.fromkeys(args.peer):
        if peer == "ponder":
            out.append(("ponder", lambda: peers.ponder_server(args.model, args.ponder_args)))
        else:
            gguf = resolve_model_path(args.model, _cache_dir())
            slots, ctx = max(args.concurrency), peers.slot_context(largest)
            out.append(("llama.cpp", lambda: peers.llama_server(gguf, slots, ctx)))
    for item in args.base_url:
        name, sep, url = item.partition("=")
        name, url = (name, url) if sep and "://" not in name else (item, item)
        out.append((name, lambda t=Target(name, url): nullcontext(t)))
    return out


def cmd_serve(args) -> int:
    from ponder.bench.client import Target, run_workload, scrape_metrics
    from ponder.bench.metrics import RunResult, compute_metrics
    from ponder.bench.prometheus import engine_counters
    from ponder.bench.workloads import warmup
    from ponder.model.loader import load_tokenizer

    if not args.peer and not args.base_url:
        args.peer = ["ponder"]
    cache_dir, slos = _cache_dir(), _slos(args)
    tokenizer = load_tokenizer(args.model, cache_dir)
    # A different seed per concurrency level: repeated prompts would be prefix-cache hits.
    workloads = {c: _spec(args, args.num_requests or max(16, 2 * c)).build(tokenizer, tokenizer.vocab_size,
                                                                          seed=args.seed + i)
                 for i, c in enumerate(args.concurrency)}
    largest = max(workloads.values(), key=lambda w: w.max_prompt_len + w.output_len)
    runs = []
    for name, endpoint in _serve_endpoints(args, largest):
        with endpoint() as running:
            target = Target(name, running.base_url)
            print(f"{name}: {target.base_url}", file=sys.stderr)
            run_workload(target, warmup(largest), 1, progress=False)
            for c, workload in workloads.items():
                before = scrape_metrics(target.root)
                records, duration = run_workload(target, workload, c, args.request_rate, args.seed, _progress(args))
                counters = engine_counters(before, scrape_metrics(target.root))
                runs.append(RunResult(name, "serve", c, workload.describe(), records, duration,
                                      compute_metrics(records, duration, slos), args.request_rate, counters,
                                      {"base_url": target.base_url}))
                m = runs[-1].metrics
                print(f"{name} c={c}: {m.output_throughput:.1f} out tok/s, {m.failed} failed", file=sys.stderr)
    _finish(args, "serve", runs, goodput_slos=slos)
    return 0 if all(r.metrics.failed == 0 for r in runs) else 1


def cmd_single_stream(args) -> int:
    from ponder.bench import peers, report, single_stream
    from ponder.config import engine_options
    from ponder.config import EngineConfig
    from ponder.engine.engine import LLMEngine
    from ponder.model.loader import resolve_model_path

    if args.pp < 0 or args.tg < 0 or not (args.pp or args.tg) or args.repetitions < 1:
        raise SystemExit("single-stream: --pp and --tg must be >= 0 (not both 0), --repetitions >= 1")
    model_path = resolve_model_path(args.model, _cache_dir())
    # Built first so a missing llama-bench or a non-GGUF model fails before the long part.
    llama_argv = (peers.llama_bench_argv(model_path, args.pp, args.tg, args.repetitions)
                  if "llama.cpp" in args.peer else None)
    machine = report.machine_info()
    print(f"cpu: {machine['cpu_model']} (avx512_vnni: {'yes' if machine['avx512_vnni'] else 'no'}), "
          f"{machine['torch_threads']} torch threads", file=sys.stderr)
    options = {**engine_options(args), "enable_prefix_caching": False}
    engine = LLMEngine(EngineConfig.from_options(args.model, **options))
    results = single_stream.measure_ponder(engine, args.pp, args.tg, args.repetitions, args.seed)
    info = single_stream.engine_info(engine.stats())
    del engine                          # its memory back before llama.cpp runs
    llama = None
    if llama_argv:
        print("llama.cpp: " + " ".join(llama_argv), file=sys.stderr)
        rows = peers.run_llama_bench(llama_argv)
        results += single_stream.parse_llama_bench(rows)
        llama = {"argv": llama_argv, **single_stream.llama_bench_info(rows), "rows": rows}
    title = f"single stream · {os.path.basename(model_path)} · ponder: {single_stream.describe(info)}"
    if llama:
        title += (f" · llama.cpp: {llama.get('model_type', '?')}, build {llama.get('build_commit', '?')}, "
                  f"{llama.get('n_threads', '?')} threads")
    print(f"{title}\n{single_stream.table(results)}")
    if args.output:
        document = {"command": "single-stream", "machine": machine, "model": model_path,
                    "pp": args.pp, "tg": args.tg, "repetitions": args.repetitions, "seed": args.seed,
                    "config": options, "engine": info, "llama.cpp": llama,
                    "comparison": single_stream.comparison(results), "runs": [r.to_dict() for r in results]}
        report.write_json(args.output, document)
        print(f"\nresults: {args.output}")
    return 0


def cmd_roofline(args) -> int:
    import json

    from ponder.bench import report, roofline
    from ponder.model.config import ModelConfig
    from ponder.model.gguf import gguf_config, read_reader
    from ponder.model.loader import resolve_model_path

    path = resolve_model_path(args.model, _cache_dir())
    if os.path.isdir(path):
        cfg = ModelConfig.from_hf(json.load(open(os.path.join(path, "config.json"))))
    else:
        cfg = gguf_config(read_reader(path))
    cost = roofline.model_cost(cfg)
    peaks = roofline.measure_peaks(args.bandwidth_mb, args.matmul_size)
    roof = roofline.roofline(cost, peaks)
    print(f"machine: {peaks.bandwidth_gbs:.1f} GB/s read, {peaks.matmul_gflops:.1f} GFLOP/s fp32 mm "
          f"({peaks.threads} threads)")
    print(f"model: {cost.params / 1e6:.1f}M params, {cost.bytes_per_step / 1e6:.0f} MB fp32 read per decode step, "
          f"{cost.flops_per_token / 1e9:.2f} GFLOP per token")
    print(f"bounds: {roof.bandwidth_tok_s:.1f} tok/s per sequence (bandwidth), "
          f"{roof.compute_tok_s:.1f} tok/s (compute)")
    rows = []
    for results_path in args.results:
        with open(results_path) as f:
            rows += [{"results": results_path, **row} for row in roofline.run_percentages(json.load(f), roof)]
    for row in rows:
        print(f"  {row['name']:<12} {row['mode']:<8} c={row['concurrency']:<4} "
              f"{row['output_throughput']:8.1f} out tok/s = {row['pct_of_attainable']:5.1f}% of "
              f"{row['attainable_tok_s']:.0f} attainable; {row['total_throughput']:8.1f} tok/s = "
              f"{row['pct_of_compute']:5.1f}% of compute")
    if args.output:
        import dataclasses

        report.write_json(args.output, {"command": "roofline", "machine": report.machine_info(), "model": path,
                                        "peaks": dataclasses.asdict(peaks), "cost": dataclasses.asdict(cost),
                                        "roofline": dataclasses.asdict(roof), "runs": rows})
        print(f"\nresults: {args.output}")
    return 0


def cmd_tune(args) -> int:
    from ponder.bench import offline
    from ponder.config import engine_options
    from ponder.model.loader import load_model

    slos = _slos(args)
    loaded = load_model(args.model, _cache_dir())
    workload = _spec(args).build(loaded.tokenizer, loaded.config.vocab_size)
    runs = []
    for tokens in args.batched_tokens_grid:
        for seqs in args.num_seqs_grid:
            options = {**engine_options(args), "max_num_batched_tokens": tokens, "max_num_seqs": seqs}
            run = offline.run_ponder(workload, loaded, options, _progress(args), slos)
            run.name = f"mnbt={tokens},mns={seqs}"
            runs.append(run)
            print(f"{run.name}: {run.metrics.output_throughput:.1f} out tok/s", file=sys.stderr)
    best = max(runs, key=lambda r: r.metrics.output_throughput)
    print(f"best for {workload.name}: max_num_batched_tokens={best.config['max_num_batched_tokens']} "
          f"max_num_seqs={best.config['max_num_seqs']} ({best.metrics.output_throughput:.1f} out tok/s)")
    args.no_plots = True
    _finish(args, "tune", runs, best={"max_num_batched_tokens": best.config["max_num_batched_tokens"],
                                      "max_num_seqs": best.config["max_num_seqs"],
                                      "output_throughput": best.metrics.output_throughput})
    return 0
