"""One seeded result of every strategy, pinned: refactors of the engine, the sampler or think must
leave them identical. Every sampling field is spelled out, so a change of defaults does not move
them. Regenerate (only for an intended change of behaviour) with
`python -m tests.think.test_think_pinned`, and say why in the commit."""

from __future__ import annotations

import json
import os
import tempfile

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.model.loader import LoadedModel
from ponder.model.tokenizer import Tokenizer
from ponder.think.run import think
from tests.conftest import tiny_config, tiny_model, write_byte_tokenizer

PINNED = os.path.join(os.path.dirname(__file__), "data", "pinned_seeded_results.json")
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "min_p": 0.0, "max_tokens": 12, "seed": 1234}
RUNS = {
    "greedy": {},
    "parallel": {"n": 3},
    "self-consistency": {"n": 4, "vote": "majority"},
    "best-of-n": {"n": 3, "scorer": "self-eval"},
    "deepconf": {"n": 4, "warmup": 2, "keep_top": 0.5, "window": 4},
    "beam-search": {"n": 4, "width": 2, "scorer": "confidence", "max_steps": 3, "step_max_tokens": 4},
    "particle-filtering": {"n": 3, "scorer": "self-eval", "max_steps": 3, "step_max_tokens": 4},
}
QUESTION = "What is 2 + 3?"


def seeded_results(tokenizer_dir: str) -> dict:
    cfg = tiny_config()
    loaded = LoadedModel(tiny_model(cfg), cfg, Tokenizer(tokenizer_dir, cfg.eos_token_ids), "tiny")
    out = {}
    for strategy, options in RUNS.items():
        engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=256, block_size=4), loaded=loaded)
        [result] = think(engine, [QUESTION], strategy, **options, **SAMPLING)
        out[strategy] = {"answer": result.answer, "final_answer": result.final_answer,
                         "candidates": [c.text for c in result.candidates],
                         "generated_tokens": result.usage["generated_tokens"]}
        engine.pool.check_empty()
    return out


def test_every_strategy_gives_its_pinned_result(byte_tokenizer_dir):
    assert seeded_results(byte_tokenizer_dir) == json.load(open(PINNED))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        write_byte_tokenizer(folder)
        results = seeded_results(folder)
    with open(PINNED, "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    print(f"wrote {PINNED}")
