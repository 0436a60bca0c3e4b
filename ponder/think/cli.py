"""`ponder think "question" --strategy self-consistency -n 8`: the think subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from ponder.config import add_engine_arguments
from ponder.sampling_params import add_sampling_arguments, sampling_fields
from ponder.think.options import OPTIONS
from ponder.think.run import ALIASES, DEFAULT_STRATEGY, THINK_MAX_TOKENS, strategy_name
from ponder.think.catalog import STRATEGIES


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("think", help="answer a question with inference-time compute (branches share KV)")
    p.add_argument("question")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, type=_strategy,
                   help=f"{', '.join(STRATEGIES)} (or {', '.join(ALIASES)}; underscores work too)")
    for option in OPTIONS.values():            # every strategy option a command line can carry
        if option.kind is not None:
            flags = ["-n"] if option.name == "n" else ["--" + option.name.replace("_", "-")]
            p.add_argument(*flags, dest=option.name, type=option.kind, default=None, choices=option.choices,
                           help=option.help)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-chat-template", action="store_true", help="send the question as a raw prompt")
    p.add_argument("--max-tokens", type=int, default=THINK_MAX_TOKENS, help="per branch")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_engine_arguments(p)
    return p


def _strategy(text: str) -> str:
    name = strategy_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown strategy {text!r}; choose one of {', '.join(STRATEGIES)}")
    return name


def think_options(args) -> dict:
    options = {name: getattr(args, name) for name, option in OPTIONS.items()
               if option.kind is not None and getattr(args, name) is not None}
    options.update(sampling_fields(args), max_tokens=args.max_tokens)
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
