"""Quantized weights: each linear matrix and the embedding table kept in a block format.

`weights="native"` keeps every GGUF tensor in the format the file stores it in; "q8_0" / "q4_0"
requantize (from the file's values, or from a Hugging Face folder's floats) with the `gguf`
package's quantizers. A fused matrix (Q/K/V, gate/up) is a list of segments, one per stretch of
rows that shares a format, so Qwen's mixed-format layers are never requantized to one format.
F32/F16/BF16 tensors become float32 segments. The packed result is cached as one safetensors
file (loaded by mmap) with the segment layout in its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file, safe_open, save_file

from ponder.layers.quant_linear import QuantEmbedding, QuantLinear, QuantMatrix
from ponder.model import repack
from ponder.model.config import ModelConfig
from ponder.model.dequant import dequantize
from ponder.model.llama import LlamaForCausalLM
from ponder.model.names import linear_sources, other_sources

REQUANT_TYPES = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
EMBEDDING = "embed_tokens"


@dataclass
class Source:
    """One checkpoint matrix [N, K]: GGUF bytes in `qtype`, or floats (qtype None)."""

    n: int
    k: int
    qtype: QT | None = None
    raw: np.ndarray | None = None       # uint8 [N, row bytes]
    floats: torch.Tensor | None = None  # float32 [N, K]

    def to_float(self) -> torch.Tensor:
        if self.floats is not None:
            return self.floats.float()
        return dequantize(self.raw, self.qtype, (self.n, self.k))

    def permute_rows(self, order: np.ndarray) -> "Source":
        if self.raw is not None:
            return Source(self.n, self.k, self.qtype, self.raw[order])
        return Source(self.n, self.k, floats=self.floats[torch.from_numpy(order)])


def _encoded(src: Source, weights: str) -> Source:
    """The source in the format it will run in: as stored, or requantized."""
    if weights == "native":
        return src if src.qtype in repack.FORMATS or src.qtype is None else Source(src.n, src.k, floats=src.to_float())
    target = REQUANT_TYPES[weights]
    import gguf

    raw = gguf.quants.quantize(src.to_float().numpy(), target)
    return Source(src.n, src.k, target, raw.reshape(src.n, -1))


def _segments(sources: list[Source]) -> list[tuple[QT | None, np.ndarray | torch.Tensor, int, int]]:
    """Consecutive sources of one quantized format merged (their rows simply stack)."""
    runs: list[list[Source]] = []
    for s in sources:
        if runs and s.qtype is not None and runs[-1][-1].qtype == s.qtype and runs[-1][-1].n % repack.ROWS_PER_GROUP == 0:
            runs[-1].append(s)
        else:
            runs.append([s])
    out = []
    for run in runs:
        n, k = sum(s.n for s in run), run[0].k
        if run[0].qtype is None:
            out.append((None, torch.cat([s.floats.float() for s in run]).contiguous(), n, k))
        else:
            out.append((run[0].qtype, np.concatenate([s.raw for s in run]), n, k))
    return out


def quantize_checkpoint(matrices: dict[str, Source], others: dict[str, torch.Tensor], cfg: ModelConfig,
                        weights: str) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Packed tensors and their layout {module: [[format id or None, n, k], ...]}."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list] = {}
    modules = dict(linear_sources(cfg))
    modules[EMBEDDING] = ["model.embed_tokens.weight"]
    if cfg.tie_word_embeddings:
        modules.pop("lm_head", None)
    for module, names in modules.items():
        layout[module] = []
        for i, (qtype, data, n, k) in enumerate(_segments([_encoded(matrices[name], weights) for name in names])):
            if qtype is None:
                tensors[f"{module}.{i}"] = data
                layout[module].append([None, n, k])
            else:
                fmt = repack.FORMATS[qtype]
                tensors[f"{module}.{i}"] = torch.from_numpy(repack.pack(repack.split(data, qtype, n, k), fmt))
                layout[module].append([fmt.id, n, k])
    tensors.update({name: t.float().contiguous() for name, t in others.items()})
    return tensors, layout


def save(path: str, tensors: dict[str, torch.Tensor], layout: dict[str, list]) -> None:
    save_file(tensors, path, metadata={"layout": json.dumps(layout)})


def load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Tensors mapped from the file (not copied) and the layout."""
    with safe_open(path, framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
    return load_file(path), layout


def build(cfg: ModelConfig, tensors: dict[str, torch.Tensor], layout: dict[str, list],
          max_positions: int) -> LlamaForCausalLM:
    """The model with QuantLinear / QuantEmbedding modules in place of the float ones."""
    net = LlamaForCausalLM(cfg, max_positions)

    def matrices(module: str) -> list[QuantMatrix]:
        return [QuantMatrix(fmt, n, k, tensors[f"{module}.{i}"]) for i, (fmt, n, k) in enumerate(layout[module])]

    for module in layout:
        if module == EMBEDDING:
            continue
        net.set_submodule(module, QuantLinear(matrices(module), tensors.get(module + ".bias")))
    net.embed_tokens = QuantEmbedding(matrices(EMBEDDING)[0])
    if cfg.tie_word_embeddings:
        net.lm_head = QuantLinear(matrices(EMBEDDING))
    expected = {name for name in other_sources(cfg) if not name.endswith(".bias")}
    missing = expected - set(tensors)
    if missing:
        raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")
    net.load_state_dict({name: tensors[name] for name in expected}, strict=False, assign=True)
    return net.eval()


def weight_bytes(net: torch.nn.Module) -> int:
    """Bytes the model's weights hold (packed matrices, shared ones once, plus float tensors)."""
    seen: dict[int, int] = {}
    for module in net.modules():
        for m in getattr(module, "matrices", []) + ([module.matrix] if isinstance(module, QuantEmbedding) else []):
            seen[m.data.data_ptr()] = m.nbytes
        if not isinstance(module, (QuantLinear, QuantEmbedding)):
            for p in module.parameters(recurse=False):
                if p.numel():
                    seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())
