"""EngineConfig: every engine knob in one validated dataclass (no globals)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

WEIGHT_FORMATS = ("native", "q8_0", "q4_0", "fp32")
KV_CACHE_DTYPES = ("fp16", "fp32")
DTYPES = ("float32", "bfloat16", "float16")
SAMPLING_DEFAULT_SOURCES = ("model", "ponder", "none")   # see ponder/sampling_params.py
SPECULATIVE_METHODS = ("ngram", "draft", "tree")


def _option(default, help: str, choices: tuple[str, ...] | None = None, flag: str | None = None):
    """A field with what the command line needs to offer it (see ponder/cli.py's engine flags)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


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

    model: str | None = _option(None, "packaged name, GGUF file or HF folder (default: smollm2-135m-instruct)")
    dtype: str = _option("float32", "compute dtype of the fp32 path", choices=DTYPES)
    block_size: int = _option(16, "tokens per KV cache block")
    num_kv_blocks: int | None = _option(None, "KV cache blocks (overrides kv_cache_memory_gb)")
    kv_cache_memory_gb: float = _option(2.0, "memory for the KV cache, GB")
    max_num_seqs: int = _option(64, "most sequences in one step")
    max_num_batched_tokens: int = _option(1024, "token budget of one step")
    max_model_len: int | None = _option(None, "longest sequence (default: the model's context length)")
    enable_prefix_caching: bool = _option(True, "reuse the KV blocks of shared prompt prefixes",
                                          flag="prefix-caching")
    weights: str | None = _option(None, "native: GGUF tensors as stored (default for GGUF); q8_0/q4_0: "
                                        "requantize at load; fp32: the dequantized reference path "
                                        "(default for HF folders)", choices=WEIGHT_FORMATS)
    kv_cache_dtype: str | None = _option(None, "default: fp16 on the quantized path, fp32 with fp32 weights",
                                         choices=KV_CACHE_DTYPES)
    num_threads: int | None = _option(None, "torch and kernel threads (default: torch's)")
    seed: int = _option(0, "the engine's seed, for requests that set none", flag="engine-seed")
    sampling_defaults: str = _option("model", "sampling for fields a request leaves unset: model (its recommended "
                                              "sampling over ponder's), ponder (temperature 0.8, top-k 40, top-p "
                                              "0.95, min-p 0.05), none (temperature 1, no truncation)",
                                     choices=SAMPLING_DEFAULT_SOURCES)
    speculative_method: str | None = _option(None, "speculative decoding: ngram (prompt lookup), draft (a "
                                                   "speculative_model proposes a chain) or tree (it proposes a "
                                                   "token tree); default: none", choices=SPECULATIVE_METHODS)
    speculative_model: str | None = _option(None, "the draft model (packaged name, GGUF or HF folder) of "
                                                  "speculative_method draft; its KV shares kv_cache_memory_gb")
    num_speculative_tokens: int = _option(4, "most draft tokens verified per sequence and step (a tree's nodes)")
    speculative_adaptive: bool = _option(True, "grow and shrink each sequence's draft length with its acceptance "
                                               "(LLMCad's fallback); off: always num_speculative_tokens")
    speculative_tree_width: int = _option(2, "tree: candidates under each node the draft expands, and nodes "
                                             "expanded per draft forward")
    prompt_lookup_min: int = _option(1, "ngram: shortest suffix looked up")
    prompt_lookup_max: int = _option(3, "ngram: longest suffix looked up")
    speculative_disable_by_batch_size: int = _option(4, "no drafts while more sequences than this decode "
                                                        "(a step is compute-bound then)")
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "PONDER_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ponder")),
        metadata={"help": "where converted weights and built kernels are kept ($PONDER_CACHE_DIR)"})

    def __post_init__(self) -> None:
        _positive(self, "block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens",
                  "speculative_tree_width", "prompt_lookup_min", "prompt_lookup_max", "speculative_disable_by_batch_size")
        if self.speculative_method is not None and self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                             f"got {self.speculative_method!r}")
        drafted = self.speculative_method in ("draft", "tree")
        if drafted != (self.speculative_model is not None):
            raise ValueError("speculative_method 'draft' or 'tree' and speculative_model go together"
                             + (": give speculative_model" if drafted else ": set speculative_method 'draft' or 'tree'"))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.sampling_defaults not in SAMPLING_DEFAULT_SOURCES:
            raise ValueError(f"sampling_defaults must be one of {', '.join(SAMPLING_DEFAULT_SOURCES)}, "
                             f"got {self.sampling_defaults!r}")
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


# -- the command line: every field above as a flag ------------------------------------------------
def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """A flag for every EngineConfig field, generated from its definition (type, help, choices), so
    every engine option is settable from every command. Unset flags leave EngineConfig's default."""
    types = typing.get_type_hints(EngineConfig)
    g = p.add_argument_group("engine options")
    for f in dataclasses.fields(EngineConfig):
        flag, dest = "--" + _flag(f).replace("_", "-"), _flag(f)
        kind = next(t for t in (bool, int, float, str) if t is types[f.name] or t in typing.get_args(types[f.name]))
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        if kind is bool:
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(flag, dest=dest, type=kind, default=None, choices=f.metadata.get("choices"),
                           help=help_text)


def engine_options(args) -> dict:
    """The engine options set on the command line (the model aside), for EngineConfig."""
    return {f.name: getattr(args, _flag(f)) for f in dataclasses.fields(EngineConfig)
            if f.name != "model" and getattr(args, _flag(f), None) is not None}


def _flag(f: dataclasses.Field) -> str:
    """The option's name on the command line (and its argparse dest): the field's, unless it says
    otherwise — `seed` is `--engine-seed`, since `--seed` is a request's."""
    return (f.metadata.get("flag") or f.name).replace("-", "_")
