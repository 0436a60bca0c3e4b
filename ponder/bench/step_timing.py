"""Time ponder's engine step by step over a sweep of batches, for the per-step cost model.

Each sweep point queues `batch` random-token requests of `prompt_len` tokens and `output_len` new
tokens on an engine whose step budget is `budget` tokens (prefix caching off: every prompt token is
computed), steps it dry and records, per step, its wall time and what it computed (`StepShape`).
A staggered point queues half the requests, and the other half once the first decode row runs, so
that steps mix prefill chunks with decodes. The shape is read from the scheduler's plan by wrapping
that one engine's `scheduler.schedule` (an instance attribute; the engine's code is untouched).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from ponder.bench.costmodel import StepShape, chunk_shape
from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.engine.scheduler import SchedulerOutput
from ponder.model.loader import LoadedModel
from ponder.sampling_params import SamplingParams


@dataclass(frozen=True)
class SweepPoint:
    batch: int              # requests
    prompt_len: int         # tokens per prompt
    output_len: int         # new tokens per request
    budget: int             # the engine's max_num_batched_tokens
    stagger: bool = False   # the second half of the requests arrives once the first half decodes

    @property
    def name(self) -> str:
        return f"b{self.batch}-in{self.prompt_len}-out{self.output_len}-T{self.budget}" + ("-mixed" * self.stagger)


# Decode rows x context at a few batch sizes; prefill chunks of several sizes at rising positions;
# mixed steps. About 30k prompt tokens in 278 steps: meant to take under two minutes for the default
# model on 2 idle cores (not yet timed idle; on a busy machine it took ten).
DEFAULT_SWEEP = (
    *(SweepPoint(b, n, 16, 1024) for b, n in ((1, 16), (1, 768), (8, 256), (8, 768), (32, 16), (32, 256))),
    *(SweepPoint(2, 1024, 2, t) for t in (64, 256, 1024)),
    SweepPoint(16, 128, 24, 512, stagger=True),
    SweepPoint(8, 512, 16, 256, stagger=True),
    SweepPoint(4, 256, 48, 96, stagger=True),
)
# A few seconds: for checking that the command works, not for a fit to trust.
SMALL_SWEEP = (SweepPoint(1, 16, 4, 64), SweepPoint(4, 64, 4, 64), SweepPoint(2, 96, 2, 32),
               SweepPoint(4, 32, 6, 48, stagger=True))
SWEEPS = {"default": DEFAULT_SWEEP, "small": SMALL_SWEEP}


@dataclass
class TimedStep:
    point: str
    shape: StepShape
    seconds: float


def plan_shape(plan: SchedulerOutput) -> StepShape:
    """What a scheduled step computes: a chunk of one token past the prompt is a decode row."""
    total = StepShape()
    for ch in plan.chunks:
        start, seq = ch.seq.num_computed_tokens, ch.seq
        total += chunk_shape(start, ch.num_tokens, decode=ch.num_tokens == 1 and start >= seq.num_prompt_tokens)
    return total


class PlanRecorder:
    """Keeps the shape of the latest plan `engine`'s scheduler made."""

    def __init__(self, engine: LLMEngine):
        self.shape: StepShape | None = None
        schedule = engine.scheduler.schedule

        def recorded() -> SchedulerOutput:
            plan = schedule()
            self.shape = plan_shape(plan) if plan.chunks else None
            return plan

        engine.scheduler.schedule = recorded


def _prompts(point: SweepPoint, vocab_size: int, rng: random.Random) -> list[list[int]]:
    hi = min(vocab_size, 32000)
    return [[rng.randrange(100, hi) for _ in range(point.prompt_len)] for _ in range(point.batch)]


def time_point(engine: LLMEngine, recorder: PlanRecorder, point: SweepPoint, seed: int) -> list[TimedStep]:
    """Run one sweep point to the end on `engine`; every step that computed something, timed."""
    params = SamplingParams(temperature=0.0, max_tokens=point.output_len, ignore_eos=True)
    prompts = _prompts(point, engine.vocab_size, random.Random(seed))
    later = prompts[len(prompts) // 2:] if point.stagger else []
    for prompt in prompts[:len(prompts) - len(later)]:
        engine.add_request(None, params, prompt_token_ids=prompt)
    steps = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t
        if recorder.shape is None:
            continue
        steps.append(TimedStep(point.name, recorder.shape, seconds))
        if later and recorder.shape.decode_rows:
            for prompt in later:
                engine.add_request(None, params, prompt_token_ids=prompt)
            later = []
    return steps


def run_sweep(loaded: LoadedModel, engine_options: dict, points=DEFAULT_SWEEP, seed: int = 0,
              progress: bool = True) -> list[TimedStep]:
    """Time every point (one engine per step budget, sharing the loaded model); the first point
    runs twice and its first run is dropped (warm-up: kernel builds, allocator)."""
    engines: dict[int, tuple[LLMEngine, PlanRecorder]] = {}
    steps: list[TimedStep] = []
    for i, point in enumerate(tqdm([points[0], *points], desc="step sweep", disable=not progress, leave=False)):
        if point.budget not in engines:
            blocks = max(-(-p.batch * (p.prompt_len + p.output_len + 1) // 16) for p in points) + 16
            options = {"num_kv_blocks": blocks, "max_num_seqs": max(p.batch for p in points), **engine_options,
                       "max_num_batched_tokens": point.budget, "enable_prefix_caching": False, "block_size": 16}
            engine = LLMEngine(EngineConfig(model=loaded.path, **options), loaded=loaded)
            engines[point.budget] = engine, PlanRecorder(engine)
        timed = time_point(*engines[point.budget], point, seed + i)
        if i:
            steps += timed
    return steps
