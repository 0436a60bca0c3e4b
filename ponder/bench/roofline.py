"""Roofline: this machine's memory bandwidth and matmul FLOP/s, and what they allow a model.

Decode at small batch is memory-bound: a step reads every weight once, so one sequence can do at most
bandwidth / weight bytes tokens per second, and a batch of B at most B times that. Large batches are
compute-bound: about 2 x (matmul parameters) FLOPs a token, prompt or output. Attention over the
KV cache is left out (small at these context lengths), so the bounds are optimistic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ponder.model.config import ModelConfig


@dataclass
class MachinePeaks:
    bandwidth_gbs: float      # GB/s read (10^9 bytes)
    matmul_gflops: float      # fp32 torch.mm GFLOP/s
    threads: int


def _best_time(fn, reps: int) -> float:
    fn()                                   # warm-up: page in, pick kernels
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(megabytes: int = 256, reps: int = 5) -> float:
    """Read bandwidth in GB/s: the best time to sum a fp32 tensor far larger than the caches."""
    import torch

    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    return x.numel() * 4 / _best_time(x.sum, reps) / 1e9


def measure_matmul(size: int = 1024, reps: int = 10) -> float:
    """fp32 torch.mm GFLOP/s on square matrices."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / _best_time(lambda: torch.mm(a, b), reps) / 1e9


def measure_peaks(megabytes: int = 256, matmul_size: int = 1024) -> MachinePeaks:
    import torch

    return MachinePeaks(measure_bandwidth(megabytes), measure_matmul(matmul_size), torch.get_num_threads())


@dataclass
class ModelCost:
    params: int                  # all parameters (a tied embedding counted once)
    matmul_params: int           # parameters that multiply every token: linear layers + output head
    bytes_per_step: int          # weight bytes a decode step reads
    flops_per_token: int         # ~2 x matmul_params


def model_cost(cfg: ModelConfig, bytes_per_param: int = 4) -> ModelCost:
    """Count a Llama-family model's parameters from its config (fp32 weights by default)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.qkv_bias else 0)
    mlp = 3 * h * cfg.intermediate_size
    norms = cfg.num_layers * (2 * h + (2 * cfg.head_dim if cfg.qk_norm else 0)) + h
    head = embed = cfg.vocab_size * h
    matmul = cfg.num_layers * (attention + mlp) + head   # the embedding lookup reads a row, the head all
    params = matmul + norms + (0 if cfg.tie_word_embeddings else embed)
    return ModelCost(params, matmul, (matmul + norms) * bytes_per_param, 2 * matmul)


@dataclass
class Roofline:
    bandwidth_tok_s: float      # decode tokens/s of one sequence if only weight reads cost
    compute_tok_s: float        # tokens/s if only matmul FLOPs cost

    def attainable(self, batch: int) -> float:
        """Decode tokens/s a batch of `batch` sequences can reach at best."""
        return min(max(batch, 1) * self.bandwidth_tok_s, self.compute_tok_s)


def roofline(cost: ModelCost, peaks: MachinePeaks) -> Roofline:
    return Roofline(peaks.bandwidth_gbs * 1e9 / cost.bytes_per_step,
                    peaks.matmul_gflops * 1e9 / cost.flops_per_token)


def run_percentages(results: dict, roof: Roofline) -> list[dict]:
    """For each run of a results JSON: output tokens/s against the roofline at its concurrency, and
    all tokens/s (prompt + output, each ~2 x params FLOPs) against the compute bound."""
    rows = []
    for run in results.get("runs", []):
        m, batch = run["metrics"], run.get("concurrency", 1)
        rows.append({"name": run["name"], "mode": run.get("mode"), "concurrency": batch,
                     "output_throughput": m["output_throughput"], "total_throughput": m["total_throughput"],
                     "attainable_tok_s": roof.attainable(batch),
                     "pct_of_attainable": 100.0 * m["output_throughput"] / roof.attainable(batch),
                     "pct_of_compute": 100.0 * m["total_throughput"] / roof.compute_tok_s})
    return rows
