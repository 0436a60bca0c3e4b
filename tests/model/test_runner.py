"""ModelRunner: the KV cache dtype, the attention metadata of a mixed step, and the native fp16 path
against the padded SDPA one."""

import pytest
import torch

from ponder.engine.setup import resolve_kv_cache_dtype
from ponder.model.runner import ModelRunner

from tests.conftest import tiny_config, tiny_model

BLOCK = 4
# (tokens, first position, block table): a fresh prompt, a decode, a prompt chunk on a cached prefix.
CHUNKS = [(list(range(10, 20)), 0, [3, 4, 5]), ([7], 20, [6, 7, 8, 9, 10, 11]), ([1, 2, 3, 4, 5], 8, [12, 13, 14, 15])]


def _runner(kv_dtype, seed=0):
    cfg = tiny_config()
    runner = ModelRunner(tiny_model(cfg), 32, BLOCK, kv_dtype)
    runner.kv_cache.copy_(torch.randn(runner.kv_cache.shape, generator=torch.Generator().manual_seed(seed)))
    return runner


def test_kv_cache_dtype_resolution():
    assert resolve_kv_cache_dtype(None, "native") == "fp16"
    assert resolve_kv_cache_dtype(None, "q8_0") == "fp16"
    assert resolve_kv_cache_dtype(None, "fp32") == "fp32"      # asked for, an HF folder, or no kernels
    assert resolve_kv_cache_dtype("fp16", "fp32") == "fp16"
    assert resolve_kv_cache_dtype("fp32", "native") == "fp32"


def test_fp16_cache_holds_twice_the_blocks(make_tiny_engine):
    fp16 = make_tiny_engine(num_kv_blocks=None, kv_cache_memory_gb=1e-4, kv_cache_dtype="fp16")
    fp32 = make_tiny_engine(num_kv_blocks=None, kv_cache_memory_gb=1e-4)         # fp32 weights: fp32 KV
    assert fp16.stats()["kv_cache_dtype"] == "fp16" and fp16.runner.kv_cache.dtype == torch.float16
    assert fp32.stats()["kv_cache_dtype"] == "fp32" and fp32.runner.kv_cache.dtype == torch.float32
    assert fp16.pool.num_blocks == 2 * fp32.pool.num_blocks


def test_metadata_of_a_mixed_step():
    runner = _runner(torch.float16)
    if not runner.native_prefill:
        pytest.skip("no C compiler for the native kernel")
    _, positions, meta, _ = runner.prepare(CHUNKS)
    assert meta.groups == [] and meta.native.all_rows                   # one kernel call for everything
    assert torch.equal(meta.native.context_lens, positions + 1)
    assert meta.native.seq_index.tolist() == [0] * 10 + [1] + [2] * 5
    assert meta.native.block_tables[2].tolist() == [12, 13, 14, 15, 0, 0]

    _, _, meta32, _ = _runner(torch.float32).prepare(CHUNKS)
    assert meta32.native.rows.tolist() == [10] and meta32.native.seq_index.tolist() == [1]   # the decode
    assert meta32.native.context_lens.tolist() == [21] and not meta32.native.all_rows
    assert len(meta32.groups) == 1                                       # the prefills, on SDPA


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_native_step_matches_padded_sdpa(kv_dtype):
    native, padded = _runner(kv_dtype), _runner(kv_dtype)
    if not native.native_attention:
        pytest.skip("no C compiler for the native kernel")
    padded.native_attention = padded.native_prefill = False
    logits = native.execute(CHUNKS, [0, 1, 2])
    torch.testing.assert_close(logits, padded.execute(CHUNKS, [0, 1, 2]), atol=1e-4, rtol=1e-4)
    assert torch.equal(native.kv_cache[0], padded.kv_cache[0])          # layer 0 writes the same K/V
    torch.testing.assert_close(native.kv_cache, padded.kv_cache, atol=1e-3, rtol=1e-3)
