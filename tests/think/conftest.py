"""Fixtures for think tests: a scripted bigram "model" whose next-token distribution is written
by hand (so step scores, confidences and answers are known), run by the real engine."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.model.loader import LoadedModel
from ponder.model.tokenizer import Tokenizer
from tests.conftest import tiny_config

EOS = 258          # <|im_end|> of the byte tokenizer
FLOOR = -20.0      # logit of every token a script does not name


class BigramModel(nn.Module):
    """Logits of the next token depend only on the current token: one scripted row per token.
    It ignores the KV cache; the engine around it (scheduler, forks, parking) is the real one."""

    def __init__(self, table: torch.Tensor, config):
        super().__init__()
        self.config = config
        self.table = table
        self.rope = SimpleNamespace(cos=torch.zeros(config.max_position_embeddings, 1))

    def forward(self, input_ids, positions, kv_caches, meta):
        return input_ids

    def compute_logits(self, hidden):
        return self.table[hidden]


def bigram_table(script: dict[str, dict[str, float]], vocab_size: int = 260) -> torch.Tensor:
    """`script`: current char -> {next char (or "EOS"): probability}; unnamed chars end the text."""
    table = torch.full((vocab_size, vocab_size), FLOOR)
    table[:, EOS] = 0.0
    for current, nexts in script.items():
        row = ord(current)
        table[row] = FLOOR
        for nxt, p in nexts.items():
            table[row, EOS if nxt == "EOS" else ord(nxt)] = math.log(p)
    return table


@pytest.fixture
def make_bigram_engine(byte_tokenizer_dir):
    def make(script: dict[str, dict[str, float]], **options) -> LLMEngine:
        cfg = tiny_config()
        model = BigramModel(bigram_table(script, cfg.vocab_size), cfg)
        loaded = LoadedModel(model, cfg, Tokenizer(byte_tokenizer_dir, cfg.eos_token_ids), "bigram")
        options.setdefault("num_kv_blocks", 512)
        options.setdefault("block_size", 4)
        return LLMEngine(EngineConfig(model="bigram", **options), loaded=loaded)

    return make
