"""Benchmark workloads: reproducible prompt sets, as token ids so every engine sees the same input.

A workload is *what* is asked (prompts and output lengths); *when* it is asked (arrival pattern)
is the client's business (see `ponder.bench.client.arrival_offsets`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from ponder.bench import REPO_ROOT

DEFAULT_GSM8K_PATH = "../shared/data/gsm8k/test_dev.jsonl"      # relative to the repo root
WORKLOAD_KINDS = ("random", "offline-64", "gsm8k", "shared-prefix")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]       # token ids
    output_len: int
    ignore_eos: bool = True

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return self.output_len * len(self.prompts)

    @property
    def max_prompt_len(self) -> int:
        return max((len(p) for p in self.prompts), default=0)

    def describe(self) -> dict:
        lens = [len(p) for p in self.prompts]
        return {"name": self.name, "num_requests": len(self.prompts), "output_len": self.output_len,
                "ignore_eos": self.ignore_eos, "prompt_tokens": self.prompt_tokens,
                "prompt_len_min": min(lens, default=0), "prompt_len_max": max(lens, default=0)}


def random_tokens(num_requests: int, input_low: int, input_high: int, output_len: int, vocab_size: int,
                  seed: int = 0, name: str = "random") -> Workload:
    """Random-token prompts with uniform lengths in [input_low, input_high] (the vLLM 'random' dataset).

    Token ids come from the lower part of the vocabulary (ordinary text tokens, no specials)."""
    rng = random.Random(seed)
    hi = min(vocab_size, 32000)
    prompts = [[rng.randrange(100, hi) for _ in range(rng.randint(input_low, input_high))]
               for _ in range(num_requests)]
    return Workload(name, prompts, output_len)


def offline_64(vocab_size: int, seed: int = 0) -> Workload:
    """The 'offline-64' workload of the engine-core issue: 64 requests, prompts 64-256, 128 out."""
    return random_tokens(64, 64, 256, 128, vocab_size, seed, name="offline-64")


def shared_prefix(num_groups: int, requests_per_group: int, prefix_len: int, suffix_len: int,
                  output_len: int, vocab_size: int, seed: int = 0) -> Workload:
    """K groups of requests; the requests of a group share one long random prefix and differ in a
    short random suffix. Requests are shuffled so groups interleave, as traffic would."""
    rng = random.Random(seed)
    hi = min(vocab_size, 32000)
    tokens = lambda n: [rng.randrange(100, hi) for _ in range(n)]  # noqa: E731
    prompts = [prefix + tokens(suffix_len)
               for prefix in (tokens(prefix_len) for _ in range(num_groups))
               for _ in range(requests_per_group)]
    rng.shuffle(prompts)
    return Workload("shared-prefix", prompts, output_len)


def gsm8k(tokenizer, num_requests: int, output_len: int, path: str = DEFAULT_GSM8K_PATH,
          ignore_eos: bool = True) -> Workload:
    """The first `num_requests` GSM8K questions as user messages, rendered with the chat template."""
    questions = []
    with open(resolve_data_path(path)) as f:
        for line in f:
            if line.strip():
                questions.append(json.loads(line)["question"])
            if len(questions) == num_requests:
                break
    if len(questions) < num_requests:
        raise ValueError(f"{path} has {len(questions)} questions, asked for {num_requests}")
    prompts = [chat_ids(tokenizer, q) for q in questions]
    return Workload("gsm8k", prompts, output_len, ignore_eos=ignore_eos)


def resolve_data_path(path: str) -> str:
    """A relative path as given if it exists, else relative to the repo root (the default path is
    written relative to the repo root, so the command works from any folder)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    from_root = os.path.join(REPO_ROOT, path)
    return from_root if os.path.exists(from_root) else path


def warmup(workload: Workload, length: int = 8) -> Workload:
    """A two-token request to warm an engine up; its prompt (the first prompt's head, reversed) is
    no prefix of the workload's prompts, so it leaves nothing useful in a prefix cache."""
    return Workload("warmup", [workload.prompts[0][:length][::-1]], 2)


def chat_ids(tokenizer, user_message: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def int_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (an argparse type: positive integers, comma-separated)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_length_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64:256' -> (64, 256)."""
    lo, sep, hi = str(text).partition(":")
    try:
        low, high = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"a length is N or LOW:HIGH, got {text!r}") from None
    if low < 1 or high < low:
        raise ValueError(f"a length range needs 1 <= LOW <= HIGH, got {text!r}")
    return low, high


@dataclass
class WorkloadSpec:
    """A workload as the command line describes it; `build` makes the prompts."""

    kind: str = "random"
    num_requests: int = 16
    input_len: str = "128"            # N or LOW:HIGH
    output_len: int = 128
    seed: int = 0
    dataset_path: str = DEFAULT_GSM8K_PATH
    num_groups: int = 4               # shared-prefix: K groups
    prefix_len: int = 512             # shared-prefix: tokens shared within a group
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"unknown workload {self.kind!r}; choose from {', '.join(WORKLOAD_KINDS)}")
        if self.num_requests < 1 or self.output_len < 1:
            raise ValueError("num_requests and output_len must be >= 1")
        parse_length_range(self.input_len)

    def build(self, tokenizer, vocab_size: int, seed: int | None = None,
              num_requests: int | None = None) -> Workload:
        seed = self.seed if seed is None else seed
        n = num_requests or self.num_requests
        if self.kind == "offline-64":
            return offline_64(vocab_size, seed)
        if self.kind == "gsm8k":
            return gsm8k(tokenizer, n, self.output_len, self.dataset_path, self.ignore_eos)
        low, high = parse_length_range(self.input_len)
        if self.kind == "shared-prefix":
            groups = min(self.num_groups, n)
            return shared_prefix(groups, -(-n // groups), self.prefix_len, low, self.output_len,
                                 vocab_size, seed)
        return random_tokens(n, low, high, self.output_len, vocab_size, seed)
