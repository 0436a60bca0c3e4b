"""Greedy chain of thought on GSM8K through OpenAI-compatible servers: is ponder's evaluation sound?

`ponder bench think` measures greedy with ponder itself. This script asks the same questions the same
way (Qwen's math system prompt, the question as the user turn, temperature 0, 1024 new tokens) of
other engines running the same GGUF file — llama.cpp's llama-server, and `ponder serve` — and grades
every reply with ponder's own answer extraction. If an independent engine gets the same accuracy,
the number is the model file's, not an artefact of ponder's kernels, template or grading.

    python benchmarks/think_greedy_peers.py --peer llama.cpp --peer ponder \\
        --pool benchmarks/results/think-pool-dev-qwen0.5b.jsonl \\
        --progress /tmp/greedy-peers.jsonl --output benchmarks/results/think-greedy-peers-dev-qwen0.5b.json
    python benchmarks/think_greedy_peers.py --peer ponder --ponder-args "--weights fp32" ...   # + dequantized

Each reply (text, extracted answer, finish reason, tokens, correct) is appended to `--progress` as it
comes, and a rerun continues where it stopped. The report gives each engine's accuracy with its
Wilson interval, each pair's paired difference and how often their answers agree, and, with
`--pool`, each engine against the pool's greedy answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import ExitStack

import httpx

from ponder.bench.peers import llama_server, ponder_server
from ponder.bench.pool_stats import paired_difference, rate
from ponder.bench.think_eval import GSM8K_DATA, QWEN_MATH_PROMPT, chat_messages, load_split, write_report
from ponder.config import EngineConfig
from ponder.model.loader import resolve_model_path
from ponder.think.answers import answers_equal, extract_answer

async def ask_all(base_url: str, model: str, problems: list[dict], done: set[int], args, record) -> None:
    """Greedy replies to the problems not yet done, `args.concurrency` in flight; `record(row)` each."""
    limit = asyncio.Semaphore(args.concurrency)

    async def one(client: httpx.AsyncClient, problem: dict) -> None:
        body = {"model": model, "messages": chat_messages(problem["question"], args.system),
                "max_tokens": args.max_tokens, "temperature": 0.0,
                **({} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty})}
        async with limit:
            response = await client.post(f"{base_url}/v1/chat/completions", json=body)
        response.raise_for_status()
        reply = response.json()
        text = reply["choices"][0]["message"]["content"] or ""
        answer = extract_answer(text)
        record({"index": problem["index"], "reference": problem["reference"], "answer": answer,
                "finish_reason": reply["choices"][0]["finish_reason"],
                "tokens": reply["usage"]["completion_tokens"],
                "correct": answers_equal(answer, problem["reference"]), "text": text})

    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*[one(client, p) for p in problems if p["index"] not in done])


def load_progress(path: str | None) -> dict[str, dict[int, dict]]:
    """engine -> problem index -> row, from the progress file."""
    rows: dict[str, dict[int, dict]] = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                rows.setdefault(row.pop("engine"), {})[row["index"]] = row
    return rows


def report(rows: dict[str, dict[int, dict]], problems: list[dict], pool: dict[int, dict] | None,
           settings: dict) -> dict:
    indices = [p["index"] for p in problems]
    engines = {name: [got[i] for i in indices] for name, got in rows.items() if all(i in got for i in indices)}
    if pool is not None:
        engines["ponder bench think (the pool's greedy)"] = [pool[i] for i in indices]
    out: dict = {"settings": settings, "problems": len(indices),
                 "repetition_penalty": "as an engine's name says; where it says none, the server's default: 1.0 for "
                                       "llama-server, the model's recommended 1.05 for ponder serve and the pool",
                 "engines": {}, "pairs": {}}
    for name, got in engines.items():
        out["engines"][name] = {**rate(sum(r["correct"] for r in got), len(got)),
                                "truncated": sum(r["finish_reason"] == "length" for r in got),
                                "no_answer": sum(r["answer"] is None for r in got),
                                "generated_tokens_per_problem": round(sum(r["tokens"] for r in got) / len(got), 1)}
    names = list(engines)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out["pairs"][f"{a} vs {b}"] = {
                **paired_difference([r["correct"] for r in engines[a]], [r["correct"] for r in engines[b]]),
                "same_answer": sum(answers_equal(x["answer"], y["answer"]) for x, y in zip(engines[a], engines[b]))}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data", default=GSM8K_DATA)
    parser.add_argument("--split", default="dev", choices=("dev", "tune"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--peer", action="append", default=[], choices=("llama.cpp", "ponder"),
                        help="start this engine on the model's GGUF and ask it (repeatable)")
    parser.add_argument("--ponder-args", default="",
                        help="more `ponder serve` options for --peer ponder (e.g. \"--weights fp32\", the "
                             "dequantized reference path); the engine is then named by them")
    parser.add_argument("--server", action="append", default=[], metavar="NAME=URL",
                        help="an OpenAI-compatible server already running (repeatable)")
    parser.add_argument("--system", default=QWEN_MATH_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="sent in each request (default: none sent, the server's own default: 1.0 for "
                             "llama-server, the model's recommended 1.05 for ponder serve); the engine's name "
                             "then says it")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (llama.cpp: its slots)")
    parser.add_argument("--pool", default=None, help="a `ponder bench think` progress file: compare its greedy")
    parser.add_argument("--progress", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    problems = load_split(args.data, args.split, args.limit)
    settings = {"model": args.model, "split": args.split, "system": args.system, "max_tokens": args.max_tokens,
                "temperature": 0.0}
    rows = load_progress(args.progress)

    def recorder(engine: str):
        def record(row: dict) -> None:
            rows.setdefault(engine, {})[row["index"]] = row
            if args.progress:
                with open(args.progress, "a") as f:
                    f.write(json.dumps({"engine": engine, **row}) + "\n")
            print(f"{engine}: {len(rows[engine])}/{len(problems)}", flush=True)
        return record

    gguf = resolve_model_path(args.model, EngineConfig().cache_dir)
    servers = [tuple(item.split("=", 1)) for item in args.server]
    with ExitStack() as stack:
        for peer in args.peer:
            if peer == "llama.cpp":
                server = llama_server(gguf, slots=args.concurrency, slot_ctx=args.max_tokens + 512)
            else:
                server = ponder_server(args.model, args.ponder_args)
                peer = " ".join(["ponder", args.ponder_args]).strip()
            servers.append((peer, stack.enter_context(server).base_url))
        if args.repetition_penalty is not None:
            servers = [(f"{name}, repetition_penalty {args.repetition_penalty:g}", url) for name, url in servers]
        for name, url in servers:
            done = set(rows.get(name, {}))
            asyncio.run(ask_all(url.rstrip("/").removesuffix("/v1"), args.model, problems, done, args,
                                recorder(name)))
    pool = None
    if args.pool:
        with open(args.pool) as f:
            pool = {r["index"]: r["greedy"] for r in map(json.loads, f)}
    out = report(rows, problems, pool, settings)
    write_report(out, args.output)
    return out


if __name__ == "__main__":
    main()
