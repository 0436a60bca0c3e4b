"""How faithful is each engine's greedy decoding to the model? Teacher-forced against transformers.

`think_greedy_peers.py` saves each engine's greedy replies to the same GSM8K questions. Two engines
running the same GGUF file part ways within a few dozen tokens, because each computes the quantized
model a little differently and a near-tie flips. This script asks which engine stays closer to the
model itself: transformers (fp32, the GGUF dequantized — the correctness reference) reads each
reply after its prompt in one forward pass (the reply's text tokenized again, as the GGUF's tokenizer
splits it), and at every position we check whether the reply's
token is the reference's argmax. Where it is not, the reference's logit margin (its top logit minus
the reply token's) says whether that was a near-tie (a small margin) or a real error.

    python benchmarks/greedy_agreement.py benchmarks/results/think-greedy-peers-dev-qwen0.5b.jsonl \\
        --limit 100 --output benchmarks/results/greedy-agreement-dev-qwen0.5b.json
"""

from __future__ import annotations

import argparse
import statistics

from ponder.bench.peers import hf_model_folder
from ponder.bench.think_eval import GSM8K_DATA, QWEN_MATH_PROMPT, chat_messages, load_split, write_report
from ponder.config import EngineConfig
from ponder.model.loader import load_tokenizer, resolve_model_path

NEAR_TIE = 0.5          # a reference logit margin below this is a near-tie


def agreement(model, tokenizer, question: str, reply: str, system: str) -> dict:
    """Positions of the reply where its token is the reference's argmax, and the margins where not."""
    import torch

    prompt = tokenizer.encode(tokenizer.apply_chat_template(chat_messages(question, system),
                                                            add_generation_prompt=True))
    reply_ids = tokenizer.encode(reply, add_special_tokens=False)
    ids = torch.tensor([list(prompt) + reply_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    chosen = torch.tensor(reply_ids)
    best = logits.argmax(-1)
    margins = (logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0])[best != chosen]
    same = (best == chosen).tolist()
    return {"tokens": len(reply_ids), "agree": sum(same),
            "first_disagreement": same.index(False) if False in same else None,
            "margins": [round(m, 4) for m in margins.tolist()]}


def summarize(per_problem: list[dict]) -> dict:
    tokens = sum(p["tokens"] for p in per_problem)
    margins = [m for p in per_problem for m in p["margins"]]
    firsts = [p["first_disagreement"] for p in per_problem if p["first_disagreement"] is not None]
    return {"problems": len(per_problem), "tokens": tokens,
            "token_agreement": round(sum(p["agree"] for p in per_problem) / max(tokens, 1), 4),
            "replies_all_argmax": sum(p["first_disagreement"] is None for p in per_problem),
            "median_first_disagreement": statistics.median(firsts) if firsts else None,
            "disagreements": len(margins),
            "near_tie_share": round(sum(m < NEAR_TIE for m in margins) / max(len(margins), 1), 4),
            "median_margin": round(statistics.median(margins), 4) if margins else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("replies", help="think_greedy_peers.py's progress file")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--engine", action="append", default=None, help="engines to check (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="the first N problems")
    parser.add_argument("--system", default=QWEN_MATH_PROMPT)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from think_greedy_peers import load_progress

    config = EngineConfig()
    folder = hf_model_folder(resolve_model_path(args.model, config.cache_dir), config.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model, config.cache_dir)      # the GGUF's own, as every engine reads it
    questions = {p["index"]: p["question"] for p in load_split(GSM8K_DATA, "dev", None) + load_split(GSM8K_DATA, "tune", None)}
    replies = load_progress(args.replies)
    out = {"model": args.model, "reference": "transformers fp32, the GGUF dequantized", "near_tie": NEAR_TIE,
           "engines": {}}
    for engine in args.engine or list(replies):
        indices = sorted(replies[engine])[:args.limit]
        per_problem = [agreement(model, tokenizer, questions[i], replies[engine][i]["text"], args.system)
                       for i in indices]
        out["engines"][engine] = summarize(per_problem)
        print(engine, out["engines"][engine], flush=True)
    write_report(out, args.output)
    return out


if __name__ == "__main__":
    main()
