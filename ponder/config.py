"""EngineConfig: every engine knob in one validated dataclass (no globals)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


WEIGHT_FORMATS = ("native", "q8_0", "q4_0", "fp32")
KV_CACHE_DTYPES = ("fp16", "fp32")


@dataclass
class EngineConfig:
    """How the engine runs a model.

    `num_kv_blocks` overrides the pool size computed from `kv_cache_memory_gb`.
    `max_model_len` defaults to the model's context length.
    `weights`: how linear weights are held — "native" (GGUF tensors in their own block formats,
    run by the int8 kernels), "q8_0" / "q4_0" (requantized at load), or "fp32" (dequantized, the
    reference path). None: native for GGUF files, fp32 for Hugging Face folders.
    `kv_cache_dtype`: "fp16" or "fp32"; None: fp16 on the quantized path, fp32 with fp32 weights.
    """

    model: str | None = None
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    weights: str | None = None
    kv_cache_dtype: str | None = None
    num_threads: int | None = None
    seed: int = 0
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "PONDER_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ponder")))

    def __post_init__(self) -> None:
        _positive(self, "block_size", "max_num_seqs", "max_num_batched_tokens")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")

    @classmethod
    def from_options(cls, model: str | None = None, **options) -> "EngineConfig":
        """Build from keyword options, rejecting unknown names with a clear error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}; "
                             f"valid options: {', '.join(sorted(names))}")
        return cls(model=model, **options)


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
