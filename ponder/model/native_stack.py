"""The decoder stack of a quantized model as one native call per step (kernels/decoder_stack.c).

It runs the same kernels in the same order as `LlamaForCausalLM.forward`, so its output is
bit-identical to the Python path; what it removes is the per-layer dispatch (a dozen ctypes
calls, allocations and tensor views a layer), which at batch 1 costs more than the weights take
to stream. It applies when every linear is a QuantLinear in the kernels' formats, the attention
of the step is one native call (every query in the paged kernel), and the model has no Q/K norm.
"""

from __future__ import annotations

import ctypes

import torch

from ponder import kernels
from ponder.layers.attention import AttentionMetadata, tail_arguments
from ponder.layers.quant_linear import QuantLinear, library
from ponder.model.llama import LlamaForCausalLM

I64, F32, P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("segments", P), ("nseg", I64), ("in_", I64), ("out", I64), ("bias", P)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", P), ("post_norm", P), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("k_cache", P), ("v_cache", P)]


class _Stack(ctypes.Structure):
    _fields_ = [("linear", P), ("norm", P), ("rope", P), ("attention", P), ("silu", P),
                ("num_layers", I64), ("hidden", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64),
                ("inter", I64), ("kv_fp16", I64), ("block_size", I64), ("eps", F32), ("scale", F32),
                ("cos_table", P), ("sin_table", P), ("layers", P)]


class _Step(ctypes.Structure):
    _fields_ = [("T", I64), ("table_stride", I64), ("positions", P), ("slots", P), ("tables", P),
                ("seq_of", P), ("ctx_lens", P), ("tail_from", P), ("tail_pos", P), ("tail_stride", I64)]


def _address(library_name: str, symbol: str) -> int | None:
    lib = kernels.load(library_name)
    return None if lib is None else ctypes.cast(getattr(lib, symbol), P).value


def _linear(module: QuantLinear) -> _Linear:
    bias = None if module.bias is None else module.bias.data_ptr()
    return _Linear(ctypes.cast(module.segment_table, P), len(module.segment_table), module.in_features,
                   module.out_features, bias)


class NativeStack:
    """Built once per runner (it holds the KV cache pointers); `forward` runs one step."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_size: int):
        cfg = model.config
        attn0 = model.layers[0].self_attn
        lib = kernels.load("decoder_stack")
        self._forward = lib.decoder_stack_forward
        self._forward.argtypes, self._forward.restype = [P, P, P, P], ctypes.c_int
        self._work = lib.decoder_stack_work_floats
        self._work.argtypes, self._work.restype = [P, I64], I64
        layers = []
        for layer, cache in zip(model.layers, kv_caches):
            a, m = layer.self_attn, layer.mlp
            layers.append(_Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                                 _linear(a.qkv_proj), _linear(a.o_proj), _linear(m.gate_up_proj), _linear(m.down_proj),
                                 cache[0].data_ptr(), cache[1].data_ptr()))
        self._layers = (_Layer * len(layers))(*layers)
        self._stack = _Stack(
            _address("quant_matmul", "qlinear"), _address("layer_ops", "add_rms_norm"),
            _address("layer_ops", "rope_and_cache"), _address("paged_attention", "paged_attention"),
            _address("layer_ops", "silu_and_mul"), cfg.num_layers, cfg.hidden_size, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, int(kv_caches[0].dtype == torch.float16),
            block_size, model.layers[0].input_layernorm.eps, attn0.scale, model.rope.cos.data_ptr(),
            model.rope.signed_sin.data_ptr(), ctypes.cast(self._layers, P))
        self._keep = (model, kv_caches)   # the pointers above stay valid while this lives

    @staticmethod
    def applies(model: LlamaForCausalLM, kv_caches: list[torch.Tensor]) -> bool:
        if not isinstance(model, LlamaForCausalLM):
            return False
        linears = [getattr(layer.self_attn, n) for layer in model.layers for n in ("qkv_proj", "o_proj")]
        linears += [getattr(layer.mlp, n) for layer in model.layers for n in ("gate_up_proj", "down_proj")]
        cache = kv_caches[0]
        return (library() is not None and kernels.load("decoder_stack") is not None
                and None not in (_address("layer_ops", "add_rms_norm"), _address("paged_attention", "paged_attention"))
                and all(isinstance(m, QuantLinear) and not m.dense for m in linears)
                and not model.config.qk_norm and cache.dtype in (torch.float16, torch.float32)
                and cache.is_contiguous() and model.rope.cos.dtype == torch.float32)

    def forward(self, residual: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """residual [T, hidden] (the embeddings; updated in place and returned). `meta.native`
        must cover every row of the step."""
        q = meta.native
        step = _Step(residual.shape[0], q.block_tables.shape[1], positions.data_ptr(), meta.slot_mapping.data_ptr(),
                     q.block_tables.data_ptr(), q.seq_index.data_ptr(), q.context_lens.data_ptr(),
                     *tail_arguments(q))
        work = torch.empty(self._work(ctypes.byref(self._stack), residual.shape[0]))
        status = self._forward(ctypes.byref(self._stack), ctypes.byref(step), residual.data_ptr(), work.data_ptr())
        if status != 0:
            raise RuntimeError(f"native decoder stack failed with status {status}")
        return residual
