"""`ponder think "question" --strategy self-consistency -n 8`: the think subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from ponder.config import add_engine_arguments
from ponder.think.run import ALIASES, DEFAULT_STRATEGY, strategy_name
from ponder.think.strategies import STRATEGIES

# strategy options the command line can set: flag dest -> option name
_STRATEGY_FLAGS = {"n": "n", "scorer": "scorer", "width": "width", "vote": "vote", "max_steps": "max_steps",
                   "step_max_tokens": "step_max_tokens", "warmup": "warmup", "window": "window",
                   "consensus": "consensus", "keep_top": "keep_top", "reference": "reference"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("think", help="answer a question with inference-time compute (branches share KV)")
    p.add_argument("question")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, type=_strategy,
                   help=f"{', '.join(STRATEGIES)} (or {', '.join(ALIASES)}; underscores work too)")
    p.add_argument("-n", type=int, default=None, help="branches / samples / beams / particles")
    p.add_argument("--scorer", default=None,
                   help="self-eval, confidence, confidence-min-window, confidence-tail")
    p.add_argument("--width", type=int, default=None, help="beam search: beam width M (keep n/M)")
    p.add_argument("--vote", choices=["majority", "weighted"], default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--step-max-tokens", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="deepconf: warm-up traces")
    p.add_argument("--window", type=int, default=None, help="deepconf: tokens per confidence group")
    p.add_argument("--consensus", type=float, default=None, help="deepconf: vote share that stops all")
    p.add_argument("--keep-top", type=float, default=None, help="deepconf: 0.9 (high) or 0.1 (low)")
    p.add_argument("--reference", default=None, help="parallel: the right answer, for pass@k")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-chat-template", action="store_true", help="send the question as a raw prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_engine_arguments(p)
    return p


def _strategy(text: str) -> str:
    name = strategy_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown strategy {text!r}; choose one of {', '.join(STRATEGIES)}")
    return name


def think_options(args) -> dict:
    options = {name: getattr(args, dest) for dest, name in _STRATEGY_FLAGS.items() if getattr(args, dest) is not None}
    options.update(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return options


def run(args, engine_options: dict) -> int:
    from ponder import LLM

    llm = LLM(args.model, **engine_options)
    if args.no_chat_template:
        prompt, chat = args.question, False
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.question}]
        chat = None
    result = llm.think(prompt, args.strategy, chat=chat, **think_options(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.answer)
    summary = {"final_answer": result.final_answer, "votes": result.votes, "usage": result.usage,
               "candidates": len(result.candidates), **result.metrics}
    print(json.dumps({k: v for k, v in summary.items() if v is not None}), file=sys.stderr)
    return 0
