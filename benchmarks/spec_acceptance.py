"""Acceptance of ponder's exact speculative sampling beside rejection sampling's, per position.

ponder accepts a draft token when it equals the token the target draws under the request's own
noise (the exponential race of (seed, step, token)), which keeps a seeded request's output exactly
what it is without speculation. Rejection sampling (Leviathan et al., Chen et al.) accepts a draft
token x ~ q with probability min(1, p(x)/q(x)): its acceptance at a position is sum_x min(p, q), and
it keeps only the output's distribution, not a seeded output. Both are measured on the same texts:
the target generates seeded samples of HumanEval prompts, then both models are run over them
(teacher-forced) and at every generated position this computes

- ours: whether the draft's race winner equals the target's (same seed, same step, same penalties);
- rejection sampling: sum_x min(p(x), q(x)), p and q the two models' sampling distributions there.

    .venv/bin/python benchmarks/spec_acceptance.py --output benchmarks/results/spec-acceptance-qwen.json
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from spec_draft import humaneval_prompts

from ponder import LLM, SamplingParams
from ponder.engine.sequence import PrefixRow
from ponder.layers.sampler import SamplingBatch, processed_logits, sample, sampling_probs


def teacher_forced_logits(llm: LLM, token_ids: list[int], first: int) -> torch.Tensor:
    """Logits predicting token_ids[first:], from one prefill of the whole text, written into the
    first blocks of an idle engine's pool (one without a prefix cache that could hold them)."""
    runner = llm.engine.runner
    blocks = list(range(-(-len(token_ids) // runner.block_size)))
    return runner.execute([(token_ids, 0, blocks)], [], [(0, first - 1, len(token_ids) - 1)])


@torch.inference_mode()
def compare(target: LLM, draft: LLM, prompt_ids: list[int], output_ids: list[int], params: SamplingParams,
            seed: int) -> tuple[list[bool], list[float]]:
    text = prompt_ids + output_ids
    owner = SimpleNamespace(params=params, seed=seed, num_prompt_tokens=len(prompt_ids))
    rows = [PrefixRow(owner, text[:t]) for t in range(len(prompt_ids), len(text))]
    vocab = target.engine.vocab_size
    eos = target.engine.eos_token_ids
    p_logits = teacher_forced_logits(target, text, len(prompt_ids))
    q_logits = teacher_forced_logits(draft, text, len(prompt_ids))
    batch = SamplingBatch.build(rows, vocab, eos)
    target_draws = sample(p_logits.clone(), batch).token_ids
    assert target_draws == output_ids, "teacher-forced draws differ from the generated tokens"
    ours = [a == b for a, b in zip(target_draws, sample(q_logits.clone(), batch).token_ids)]
    p = sampling_probs(processed_logits(p_logits.float(), SamplingBatch.build(rows, vocab, eos)), batch)
    q = sampling_probs(processed_logits(q_logits.float(), SamplingBatch.build(rows, vocab, eos)), batch)
    return ours, torch.minimum(p, q).sum(dim=-1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, action="append", help="default: the model's recommended, and 1.0")
    ap.add_argument("--output")
    args = ap.parse_args()
    # no prefix cache: teacher forcing writes into the pool's first blocks, which must not be cached prompts
    target = LLM(args.target, num_kv_blocks=1024, enable_prefix_caching=False)
    draft = LLM(args.draft, num_kv_blocks=1024, enable_prefix_caching=False)
    prompts = humaneval_prompts(args.prompts)
    result = {"target": args.target, "draft": args.draft, "workload": f"humaneval[:{args.prompts}]",
              "max_tokens": args.max_tokens, "settings": []}
    for temperature in args.temperature or [None, 1.0]:
        params = [SamplingParams.with_defaults(target.engine.sampling_defaults, temperature=temperature, seed=100 + i,
                                               max_tokens=args.max_tokens) for i in range(len(prompts))]
        outs = target.generate(prompts, params, use_tqdm=False)
        ours, rejection = [], []
        for out, sp in zip(outs, params):
            o, r = compare(target, draft, out.prompt_token_ids, out.outputs[0].token_ids, sp, sp.seed)
            ours += o
            rejection += r
        row = {"temperature": params[0].temperature, "top_p": params[0].top_p, "top_k": params[0].top_k,
               "positions": len(ours), "ours_acceptance": round(sum(ours) / len(ours), 4),
               "rejection_sampling_acceptance": round(sum(rejection) / len(rejection), 4)}
        result["settings"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(result, indent=1))
    if args.output:
        json.dump(result, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
