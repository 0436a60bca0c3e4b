"""What structured output costs a decode step: the default model, 16 sequences, a five-field JSON
schema. Times every engine step of a constrained batch and, inside it, the grammar extension's
work on the step's path (waiting for the masks, applying them, advancing the matchers) and apart
from it the filling itself, which runs on a worker thread during the forward; then the same batch
unconstrained. Prints JSON (`--output` to save it).

    .venv/bin/python benchmarks/structured_cost.py --output benchmarks/results/structured-cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from ponder import LLM, SamplingParams, StructuredOutputs
from ponder.engine import structured

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 16}, "member": {"type": "boolean"},
    "tier": {"enum": ["gold", "silver", "bronze"]}},
    "required": ["name", "age", "city", "member", "tier"], "additionalProperties": False}


class Timed:
    """Accumulates the seconds spent in the grammar extension's three calls."""

    def __init__(self):
        self.seconds = 0.0
        self.parts: dict[str, float] = {}
        self._wrap(structured.GrammarMask, "prepare")
        self._wrap(structured._MaskRows, "edit_logits")
        self._wrap(structured._MaskRows, "observe")
        self._wrap(structured.Grammars, "fill_masks", on_step_path=False)

    def reset(self) -> None:
        self.seconds, self.parts = 0.0, {}

    def _wrap(self, cls, name, on_step_path=True):
        inner = getattr(cls, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.seconds += took if on_step_path else 0.0
                self.parts[name] = self.parts.get(name, 0.0) + took
        setattr(cls, name, timed)


def run(llm: LLM, constrained: bool, batch: int, max_tokens: int, timer: Timed) -> dict:
    prompt = llm.chat_prompt([{"role": "user", "content": "Describe a club member as JSON."}])
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=max_tokens, ignore_eos=not constrained,
                            structured_outputs=StructuredOutputs(json=SCHEMA) if constrained else None)
    engine = llm.engine
    for i in range(batch):
        engine.add_request(prompt, dataclasses.replace(params, seed=i))
    steps, decode_s, tokens = 0, 0.0, 0
    timer.reset()
    while engine.has_unfinished_requests():
        before = engine.stats_.generation_tokens
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        sampled = engine.stats_.generation_tokens - before
        if sampled == batch or (constrained and sampled > 0 and steps > 0):   # decode steps only
            decode_s += elapsed
            steps += 1
            tokens += sampled
    return {"constrained": constrained, "decode_steps": steps, "decode_ms_per_step": 1000 * decode_s / steps,
            "grammar_ms_per_step": 1000 * timer.seconds / max(steps, 1),
            "grammar_ms_per_step_by_part": {k: round(1000 * v / max(steps, 1), 3) for k, v in timer.parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--output")
    args = p.parse_args()
    llm = LLM(num_kv_blocks=2048)
    timer = Timed()
    llm.engine.grammars.compile(StructuredOutputs(json=SCHEMA))      # compiled before, as the server does
    run(llm, True, 2, 8, timer)                                        # warm up
    constrained = run(llm, True, args.batch, args.max_tokens, timer)
    plain = run(llm, False, args.batch, args.max_tokens, timer)
    share = constrained["grammar_ms_per_step"] / constrained["decode_ms_per_step"]
    result = {"model": "smollm2-135m-instruct", "batch": args.batch, "schema_fields": 5,
              "constrained": constrained, "unconstrained": plain,
              "grammar_share_of_constrained_step": round(share, 4),
              "constrained_over_unconstrained_step": round(constrained["decode_ms_per_step"]
                                                           / plain["decode_ms_per_step"], 4)}
    print(json.dumps(result, indent=1))
    if args.output:
        json.dump(result, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
