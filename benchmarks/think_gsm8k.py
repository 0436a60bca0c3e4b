"""GSM8K with inference-time compute: accuracy and tokens per strategy, and what native branching
saves against the same samples sent as independent requests.

    python benchmarks/think_gsm8k.py --limit 50 --out think_gsm8k.json
    python benchmarks/think_gsm8k.py --limit 2 --max-tokens 64          # smoke test
    python benchmarks/think_gsm8k.py --limit 20 --base-url ponder=http://127.0.0.1:8000/v1 \
        --base-url llama.cpp=http://127.0.0.1:8080/v1                                 # + cost comparison

Every strategy runs all its problems as ONE batch (`LLM.think` on the list), so branches of all
problems share engine steps. Strategies at budget N (default 8): greedy, self-consistency@N,
best-of-N with self-evaluation, step-level beam search (width 4) and particle filtering, the last
two scored by self-evaluation. The cost comparison runs self-consistency@N natively and as N
independent chat completions per problem against an OpenAI-compatible server (`--base-url`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ponder.think.answers import answers_equal, extract_after_hashes, extract_answer  # noqa: E402
from ponder.think.voting import tally, winner  # noqa: E402

DEFAULT_DATA = "/work/shared/data/gsm8k/test_dev.jsonl"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
INSTRUCTION = ("Solve the following math problem. Reason step by step, separating the steps with blank "
               "lines, and put the final answer in \\boxed{{}}.\n\n{question}")


def load_problems(path: str, limit: int | None) -> list[dict]:
    """GSM8K jsonl: {"question", "answer"} with the reference after "####"."""
    problems = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                problems.append({"question": row["question"], "reference": extract_after_hashes(row["answer"])})
            if limit is not None and len(problems) >= limit:
                break
    return problems


def messages_for(problem: dict) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION.format(question=problem["question"])}]


def strategy_runs(budget: int) -> dict[str, tuple[str, dict]]:
    return {
        "greedy": ("greedy", {}),
        f"self-consistency@{budget}": ("self-consistency", {"n": budget}),
        f"best-of-{budget}-self-eval": ("best-of-n", {"n": budget, "scorer": "self-eval"}),
        f"beam-search@{budget}": ("beam-search", {"n": budget, "width": min(4, budget), "scorer": "self-eval"}),
        f"particle-filtering@{budget}": ("particle-filtering", {"n": budget, "scorer": "self-eval"}),
    }


def run_strategy(llm, problems: list[dict], strategy: str, options: dict, sampling: dict) -> dict:
    """All problems as one batch; accuracy, tokens, time."""
    start = time.perf_counter()
    results = llm.think([messages_for(p) for p in problems], strategy, **options, **sampling)
    wall = time.perf_counter() - start
    per_problem, usage = [], {}
    for problem, result in zip(problems, results):
        predicted = result.final_answer or extract_answer(result.answer)
        correct = answers_equal(predicted, problem["reference"])
        per_problem.append({"reference": problem["reference"], "predicted": predicted, "correct": correct,
                            "usage": result.usage, "votes": result.votes})
        for key, value in result.usage.items():
            usage[key] = usage.get(key, 0) + value
    correct = sum(p["correct"] for p in per_problem)
    return {"strategy": strategy, "options": {k: v for k, v in options.items()},
            "accuracy": correct / len(problems), "correct": correct, "problems": len(problems),
            "wall_s": round(wall, 2), **usage,
            "generated_tokens_per_problem": usage.get("generated_tokens", 0) / len(problems),
            "per_problem": per_problem}


async def independent_requests(base_url: str, model: str, problems: list[dict], n: int, sampling: dict,
                               concurrency: int, api_key: str | None) -> dict:
    """The client-loop baseline: n separate chat completions per problem, all in flight together."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)

    async def one(client, problem, i):
        body = {"model": model, "messages": messages_for(problem), "max_tokens": sampling["max_tokens"],
                "temperature": sampling["temperature"], "n": 1}
        if sampling.get("seed") is not None:
            body["seed"] = sampling["seed"] + i
        async with limit:
            response = await client.post(f"{base_url.rstrip('/')}/chat/completions", json=body, headers=headers)
        response.raise_for_status()
        return response.json()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as client:
        replies = await asyncio.gather(*[one(client, p, i) for p in problems for i in range(n)])
    wall = time.perf_counter() - start
    prompt = sum(r["usage"]["prompt_tokens"] for r in replies)
    cached = sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0 for r in replies)
    completion = sum(r["usage"]["completion_tokens"] for r in replies)
    correct = 0
    for k, problem in enumerate(problems):
        texts = [r["choices"][0]["message"]["content"] for r in replies[k * n:(k + 1) * n]]
        voted = winner(tally([extract_answer(t) for t in texts]))
        correct += answers_equal(voted, problem["reference"])
    return {"wall_s": round(wall, 2), "requests": len(replies), "prompt_tokens": prompt,
            "prompt_tokens_cached": cached, "prompt_tokens_computed": prompt - cached,
            "generated_tokens": completion, "accuracy": correct / len(problems)}


def main(argv: list[str] | None = None, llm=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=DEFAULT_DATA, help="GSM8K jsonl (question, answer with ####)")
    parser.add_argument("--limit", type=int, default=20, help="the first N problems")
    parser.add_argument("--budget", type=int, default=8, help="samples / beams / particles per problem")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default=None,
                        help="comma-separated subset of: greedy, self-consistency, best-of, beam-search, "
                             "particle-filtering (default: all)")
    parser.add_argument("--base-url", action="append", default=[], metavar="[NAME=]URL",
                        help="OpenAI-compatible server for the cost comparison (repeatable)")
    parser.add_argument("--server-model", default=None, help="model name to send (default: --model)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight against the server")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--native-from", default=None,
                        help="a previous report whose self-consistency row is the native side of the cost "
                             "comparison (instead of running it again); its rows are kept in the output")
    parser.add_argument("--out", default="think_gsm8k.json")
    args = parser.parse_args(argv)

    problems = load_problems(args.data, args.limit)
    if llm is None and not (args.native_from and args.strategies == "none"):
        from ponder import LLM

        llm = LLM(args.model, dtype=args.dtype, kv_cache_memory_gb=args.kv_cache_memory_gb,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    wanted = [w.strip() for w in args.strategies.split(",")] if args.strategies else None
    report = {"model": args.model, "data": args.data, "problems": len(problems), "budget": args.budget,
              "max_tokens": args.max_tokens, "temperature": args.temperature, "strategies": {}}
    if args.native_from:
        with open(args.native_from) as f:
            report["strategies"].update(json.load(f)["strategies"])
    for label, (strategy, options) in strategy_runs(args.budget).items():
        if (wanted and not any(label.startswith(w) for w in wanted)) or label in report["strategies"]:
            continue
        row = run_strategy(llm, problems, strategy, options, sampling)
        report["strategies"][label] = row
        _save(report, args.out)          # after every strategy, so a long run leaves partial results
        print(f"{label:28s} accuracy {row['accuracy']:.3f}  generated {row['generated_tokens']:7d}  "
              f"prompt computed {row['prompt_tokens_computed']:7d}  cached {row['prompt_tokens_cached']:8d}  "
              f"{row['wall_s']:8.1f} s", flush=True)
    native = report["strategies"].get(f"self-consistency@{args.budget}")
    if args.base_url:
        if native is None:
            if llm is None:
                raise SystemExit("no native self-consistency row to compare against")
            native = run_strategy(llm, problems, "self-consistency", {"n": args.budget}, sampling)
        comparison = {"strategy": f"self-consistency@{args.budget}",
                      "native": {k: native[k] for k in ("wall_s", "prompt_tokens_computed", "prompt_tokens_cached",
                                                        "generated_tokens", "accuracy")},
                      "independent_requests": {}}
        for item in args.base_url:
            name, _, url = item.partition("=") if "=" in item.split("://")[0] else ("", "", item)
            name = name or url
            baseline = asyncio.run(independent_requests(url, args.server_model or args.model, problems,
                                                        args.budget, sampling, args.concurrency, args.api_key))
            baseline["prompt_tokens_computed_ratio"] = (baseline["prompt_tokens_computed"]
                                                        / max(1, native["prompt_tokens_computed"]))
            baseline["wall_time_ratio"] = baseline["wall_s"] / max(1e-9, native["wall_s"])
            comparison["independent_requests"][name] = baseline
            print(name, json.dumps(baseline), flush=True)
            report["cost_comparison"] = comparison
            _save(report, args.out)
    _save(report, args.out)
    if args.out:
        print(f"wrote {args.out}")
    return report


def _save(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
