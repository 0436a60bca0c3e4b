"""Where a decode step's time goes, at batch 1 and batch 64 (default model unless --model).

Wraps the pieces of LLMEngine.step with timers (the decoder stack is one native call, so its
inside is split by timing the matmuls and the attention kernel alone at the same shapes) and
prints milliseconds per step. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from ponder import SamplingParams
from ponder.config import EngineConfig
from ponder.engine import engine as engine_module
from ponder.engine.engine import LLMEngine
from ponder.layers import attention
from ponder.layers.quant_linear import QuantLinear

TIMES: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def profile(model: str | None, batch: int, steps: int, context: int) -> dict[str, float]:
    eng = LLMEngine(EngineConfig(model=model, max_num_seqs=batch, enable_prefix_caching=False))
    runner, net = eng.runner, eng.loaded.model
    prompts = [[(7 * i + j) % 1000 + 100 for j in range(context)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    for p in prompts:
        eng.add_request(None, params, prompt_token_ids=p)
    while any(s.num_computed_tokens < context for r in eng.requests.values() for s in r.seqs):
        eng.step()                                            # prefill, untimed
    stack = runner.native_stack
    stack.forward = timed("decoder stack (native)", stack.forward)
    net.compute_logits = timed("final norm + lm_head", net.compute_logits)
    runner.prepare = timed("batch tensors (prepare)", runner.prepare)
    engine_module.sample = timed("sampler", engine_module.sample)
    TIMES.clear()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    assert len(eng.requests) == batch, "every sequence decodes in every timed step"
    total = (time.perf_counter() - t) / steps
    out = {k: v / steps for k, v in TIMES.items()}
    out["scheduler, detokenizer, rest"] = total - sum(out.values())
    out["step"] = total
    # inside the native stack: the same matmuls and attention calls, alone
    layers = [m for m in net.modules() if isinstance(m, QuantLinear) and m is not net.lm_head]
    xs = {m.in_features: torch.randn(batch, m.in_features) for m in layers}
    t = time.perf_counter()
    for _ in range(10):
        for m in layers:
            m(xs[m.in_features])
    out["  of which matmuls"] = (time.perf_counter() - t) / 10
    _, _, meta, _ = runner.prepare([([1], context, s.block_table) for r in eng.requests.values() for s in r.seqs])
    cfg = net.config
    q = torch.randn(len(meta.native.rows), cfg.num_heads, cfg.head_dim)
    t = time.perf_counter()
    for _ in range(10):
        for cache in runner.kv_caches:
            attention.native_attention(q, cache[0], cache[1], meta.native, cfg.head_dim ** -0.5)
    out["  of which attention"] = (time.perf_counter() - t) / 10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()
    for batch in (1, 64):
        rows = profile(args.model, batch, args.steps, args.context)
        print(f"\nbatch {batch}, context {args.context}: {rows['step'] * 1e3:.2f} ms/step, "
              f"{batch / rows['step']:.0f} tok/s")
        for name, sec in rows.items():
            if name != "step":
                print(f"  {name:32s} {sec * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
