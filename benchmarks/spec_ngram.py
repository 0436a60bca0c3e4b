"""n-gram speculative decoding on a "rewrite this code with one change" workload: single stream,
greedy, the same prompts with and without speculation in one run (interleaved), on one model.
Prints tokens/s of each, the speed-up, acceptance rate and mean accepted length; checks that the
outputs are identical. `--output` saves the JSON.

    .venv/bin/python benchmarks/spec_ngram.py --model qwen2.5-coder-0.5b-instruct \\
        --output benchmarks/results/spec-ngram-qwen0.5b.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from ponder import LLM, SamplingParams

# small, self-contained sources of this repository, each with one rename asked for
TASKS = [("ponder/spec/ngram.py", "num_tokens", "count"),
         ("ponder/engine/probes.py", "wanted", "requested"),
         ("ponder/server/body.py", "StrictBody", "RequestBody"),
         ("ponder/think/voting.py", "votes", "tally_of_votes")]


def prompts(llm: LLM) -> list[list[int]]:
    root = pathlib.Path(__file__).resolve().parent.parent
    out = []
    for path, old, new in TASKS:
        code = (root / path).read_text()
        ask = f"Rewrite this Python file, renaming `{old}` to `{new}` everywhere. Output only the code.\n\n{code}"
        out.append(llm.chat_prompt([{"role": "user", "content": ask}]))
    return out


def run(llm: LLM, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]
    return out.outputs[0].token_ids, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--output")
    args = p.parse_args()
    plain = LLM(args.model, num_kv_blocks=2048)
    spec = LLM(args.model, num_kv_blocks=2048, speculative_method="ngram",
               num_speculative_tokens=args.num_speculative_tokens)
    work = prompts(plain)
    run(plain, work[0][:64], 8), run(spec, work[0][:64], 8)          # warm up both
    base_stats = dict(spec.stats())
    rows, same = [], True
    for ids in work:
        tokens_plain, t_plain = run(plain, ids, args.max_tokens)
        tokens_spec, t_spec = run(spec, ids, args.max_tokens)
        same &= tokens_plain == tokens_spec
        rows.append({"prompt_tokens": len(ids), "tokens": len(tokens_plain),
                     "plain_tok_s": round(len(tokens_plain) / t_plain, 1), "ngram_tok_s": round(len(tokens_spec) / t_spec, 1)})
    s = spec.stats()
    drafted = s["spec_draft_tokens"] - base_stats["spec_draft_tokens"]
    accepted = s["spec_accepted_tokens"] - base_stats["spec_accepted_tokens"]
    drafts = s["spec_verified_seqs"] - base_stats["spec_verified_seqs"]
    total = sum(r["tokens"] for r in rows)
    t_plain = sum(r["tokens"] / r["plain_tok_s"] for r in rows)
    t_spec = sum(r["tokens"] / r["ngram_tok_s"] for r in rows)
    result = {"model": args.model, "workload": "rewrite-with-one-change", "max_tokens": args.max_tokens,
              "num_speculative_tokens": args.num_speculative_tokens, "identical_outputs": same,
              "plain_tok_s": round(total / t_plain, 1), "ngram_tok_s": round(total / t_spec, 1),
              "speedup": round(t_plain / t_spec, 3), "acceptance_rate": round(accepted / max(drafted, 1), 3),
              "mean_accepted_per_draft": round(accepted / max(drafts, 1), 3), "prompts": rows}
    print(json.dumps(result, indent=1))
    if args.output:
        json.dump(result, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
