"""`ponder bench costmodel`: fit a cost model to ponder's own timings.

Per run (the default): one offline batch per (prompt length, output length), runtime ≈ a +
b·prompt_tokens + c·output_tokens. Per step (`--per-step`): a sweep of batches timed step by step
(bench/step_timing.py), step seconds ≈ a + b·prompt tokens + c·decode rows + d·context read +
e·context read by prefill queries, non-negative; the cluster simulator prices its steps with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def add_parser(cmds) -> argparse.ArgumentParser:
    from ponder.bench.step_timing import SWEEPS
    from ponder.bench.workloads import int_list

    cm = cmds.add_parser("costmodel", help="fit runtime = a + b*prompt_tokens + c*output_tokens from a sweep; "
                                           "--per-step: step time from prompt tokens, decode rows, context read")
    cm.add_argument("--num-requests", type=int, default=16)
    cm.add_argument("--input-lens", type=int_list, default=[32, 128, 256])
    cm.add_argument("--output-lens", type=int_list, default=[16, 64])
    cm.add_argument("--seed", type=int, default=0)
    cm.add_argument("--per-step", action="store_true",
                    help="time a sweep of batches step by step and fit the per-step model (non-negative)")
    cm.add_argument("--sweep", choices=sorted(SWEEPS), default="default",
                    help="--per-step: the batches to time (small: a few seconds, to check the command)")
    cm.add_argument("--note", default=None, help="--per-step: a note kept in the JSON (how the machine was)")
    cm.add_argument("--output", default=None, help="results JSON path")
    cm.add_argument("--no-progress", action="store_true")
    cm.set_defaults(bench_func=cmd_costmodel)
    return cm


def cmd_costmodel(args) -> int:
    return _per_step(args) if args.per_step else _per_run(args)


def _per_run(args) -> int:
    from ponder.bench import offline, report
    from ponder.bench.costmodel import fit_cost_model
    from ponder.bench.workloads import random_tokens
    from ponder.config import EngineConfig, engine_options
    from ponder.model.loader import load_model

    loaded = load_model(args.model, EngineConfig().cache_dir)
    runs = []
    for i, (inp, out) in enumerate((i, o) for i in args.input_lens for o in args.output_lens):
        workload = random_tokens(args.num_requests, inp, inp, out, loaded.config.vocab_size, args.seed + i,
                                 name=f"in{inp}-out{out}")
        run = offline.run_ponder(workload, loaded, engine_options(args), not args.no_progress)
        run.name = workload.name
        runs.append(run)
    model = fit_cost_model([r.metrics.prompt_tokens for r in runs], [r.metrics.output_tokens for r in runs],
                           [r.duration_s for r in runs])
    print(f"{'run':<16} {'prompt tok':>10} {'output tok':>10} {'runtime s':>10} {'fit s':>8}")
    for r in runs:
        m = r.metrics
        print(f"{r.name:<16} {m.prompt_tokens:>10} {m.output_tokens:>10} {r.duration_s:>10.2f} "
              f"{model.predict(m.prompt_tokens, m.output_tokens):>8.2f}")
    print(f"runtime ≈ {model.a:.3f} s + {model.b * 1e3:.4f} ms × prompt_tokens + "
          f"{model.c * 1e3:.4f} ms × output_tokens   (R² = {model.r2:.3f}, {len(runs)} runs)")
    if args.output:
        report.write_json(args.output, report.results_document("costmodel", runs,
                                                               cost_model=dataclasses.asdict(model)))
        print(f"\nresults: {args.output}")
    return 0


def _per_step(args) -> int:
    from ponder.bench import report
    from ponder.bench.costmodel import STEP_FEATURES, fit_step_cost_model
    from ponder.bench.step_timing import SWEEPS, run_sweep
    from ponder.config import EngineConfig, engine_options
    from ponder.model.loader import load_model

    loaded = load_model(args.model, EngineConfig().cache_dir)
    sweep = SWEEPS[args.sweep]
    steps = run_sweep(loaded, engine_options(args), sweep, args.seed, not args.no_progress)
    model = fit_step_cost_model([s.shape for s in steps], [s.seconds for s in steps])
    print(f"{'sweep point':<28} {'steps':>6} {'measured s':>11} {'fit s':>8}")
    for point in sweep:
        mine = [s for s in steps if s.point == point.name]
        fitted = sum(model.predict(**dataclasses.asdict(s.shape)) for s in mine)
        print(f"{point.name:<28} {len(mine):>6} {sum(s.seconds for s in mine):>11.3f} {fitted:>8.3f}")
    print(model.describe())
    if args.output:
        report.write_json(args.output, {
            "command": "costmodel", "mode": "per-step", "machine": report.machine_info(),
            "model": os.path.basename(loaded.path), "config": engine_options(args), "note": args.note,
            "form": "step_s = a + b*prompt_tokens + c*decode_rows + d*context_tokens + e*prefill_context_tokens",
            "sweep": [dataclasses.asdict(p) for p in sweep], "step_cost_model": dataclasses.asdict(model),
            "steps": {"columns": ["point", *STEP_FEATURES, "seconds"],
                      "rows": [[s.point, *dataclasses.astuple(s.shape), s.seconds] for s in steps]}})
        print(f"\nresults: {args.output}", file=sys.stderr)
    return 0
