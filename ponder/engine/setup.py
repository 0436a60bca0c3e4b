"""Building an engine's parts from its config: the model, the threads, and the KV pool sized
from the memory budget — so that engine.py holds only the loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ponder.config import EngineConfig
from ponder.engine.draft import DraftModel
from ponder.engine.kv_cache import BlockPool, KVCacheManager
from ponder.engine.scheduler import Scheduler
from ponder.model.loader import LoadedModel, load_model
from ponder.model.runner import ModelRunner
from ponder.runtime import tune_allocator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class EngineParts:
    loaded: LoadedModel
    max_model_len: int
    kv_cache_dtype: str
    pool: BlockPool
    kv: KVCacheManager
    runner: ModelRunner
    scheduler: Scheduler
    draft: DraftModel | None = None


def build_parts(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineParts:
    """Load the model (unless given), set the threads, size and allocate the KV pool."""
    tune_allocator()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    dtype = DTYPES[config.dtype]
    loaded = loaded or load_model(config.model, config.cache_dir, dtype=dtype, weights=config.weights)
    mc = loaded.config
    max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    if loaded.model.rope.cos.shape[0] < max_model_len:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's rotary table")
    kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, loaded.weights)
    kv_dtype = KV_DTYPES[kv_cache_dtype]
    draft_loaded = (load_model(config.speculative_model, config.cache_dir, max_positions=max_model_len,
                               weights=config.weights) if config.speculative_model else None)
    extra = [draft_loaded.config] if draft_loaded is not None else []
    num_blocks = config.num_kv_blocks or blocks_for_budget(config, mc, max_model_len, kv_dtype, extra)
    pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
    kv = KVCacheManager(pool)
    runner = ModelRunner(loaded.model, num_blocks, config.block_size, kv_dtype, dtype)
    scheduler = Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens)
    draft = (DraftModel(draft_loaded, num_blocks, config.block_size, kv_dtype, loaded)
             if draft_loaded is not None else None)
    return EngineParts(loaded, max_model_len, kv_cache_dtype, pool, kv, runner, scheduler, draft)


def resolve_kv_cache_dtype(kv_cache_dtype: str | None, weights: str) -> str:
    """The KV cache's element type: as configured, else fp32 with fp32 weights (the reference
    path, whose greedy output matches transformers: asked for, a Hugging Face folder's default, or
    what runs without native kernels) and fp16 with quantized ones (half the bytes a step reads,
    twice the blocks for the same memory). `weights`: the mode the model was loaded in."""
    if kv_cache_dtype is not None:
        return kv_cache_dtype
    return "fp32" if weights == "fp32" else "fp16"


def blocks_for_budget(config: EngineConfig, model_config, max_model_len: int, kv_dtype: torch.dtype,
                      also: list = ()) -> int:
    """KV blocks that fit `kv_cache_memory_gb`, but no more than max_num_seqs full contexts use.
    `also`: the configs of models that keep a pool of as many blocks beside it (a draft model),
    inside the same budget."""
    per_block = sum(ModelRunner.bytes_per_block(c, config.block_size, kv_dtype) for c in [model_config, *also])
    budget = int(config.kv_cache_memory_gb * (1 << 30)) // per_block
    useful = config.max_num_seqs * -(-max_model_len // config.block_size)
    return max(1, min(budget, useful))
