"""The sampler, vectorized over the batch.

Order of operations (as in vLLM): logit_bias and min_tokens masks, the extensions' edits (token
masks), repetition / frequency / presence penalties, then greedy argmax, or temperature -> top-k
-> top-p -> min-p -> a draw.

Extensions are the one way to give the sampler extra per-row inputs or take extra per-row outputs:
an extension looks at the step's rows, and if some need it, returns a `RowExtension` that may edit
their logits (before penalties) and may read the raw distribution and the drawn tokens, returning
a value per row (`SamplerOutput.extras[name]`).

The draw is an exponential race (argmax of p / E with E ~ Exp(1)), where the noise E for
(row, token) is a hash of the sequence's seed, the index of the token being generated and the
token id. So a seeded sequence draws the same tokens whatever else is in the batch, after
preemption, and after a fork (children get seeds of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import torch

from ponder import kernels
from ponder.outputs import Logprob

_MASK32 = 0xFFFFFFFF


class RowExtension(Protocol):
    """One step's extra input/output for some rows (built by a `SamplerExtension`)."""

    name: str
    reads_distribution: bool   # observe() needs the log-softmax of the raw logits

    def edit_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] before penalties (the sampler's working copy: may be edited in place);
        return them edited."""

    def observe(self, logprobs: torch.Tensor | None, tokens: torch.Tensor) -> dict[int, object]:
        """Log-softmax of the raw logits [B, V] (None unless reads_distribution) and the drawn
        tokens [B]; return a value per row."""


class SamplerExtension(Protocol):
    def before_forward(self, seqs: list) -> None:
        """The sequences of this step that will be sampled (the engine calls this before the
        model's forward, so work that does not need the logits can overlap it)."""

    def prepare(self, rows: list) -> RowExtension | None:
        """This step's extension for `rows` (one sequence per row), or None if no row needs it."""


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step from the scheduled sequences."""

    temperature: torch.Tensor      # [B] (0 = greedy)
    top_k: torch.Tensor            # [B] long, vocab size when disabled
    top_p: torch.Tensor            # [B]
    min_p: torch.Tensor            # [B]
    seeds: torch.Tensor            # [B] int64 in [0, 2^32)
    steps: torch.Tensor            # [B] int64: index of the token being generated
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    # penalties: None when no row uses them
    frequency: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    output_tokens: list[list[int]] | None = None
    prompt_tokens: list[list[int]] | None = None
    # sparse per-row edits: (row, token ids, values)
    logit_bias: list[tuple[int, list[int], list[float]]] | None = None
    banned: list[tuple[int, list[int]]] | None = None   # stop tokens before min_tokens
    logprobs: list[int] | None = None                    # per row: top alternatives wanted, -1 = none
    extensions: list[RowExtension] = field(default_factory=list)

    @classmethod
    def build(cls, rows: list, vocab_size: int, eos_token_ids: list[int],
              extensions: tuple[SamplerExtension, ...] = ()) -> "SamplingBatch":
        """`rows`: one `Sequence` per sampled row."""
        temps, top_k, top_p, min_p, seeds, steps = [], [], [], [], [], []
        freq, pres, rep = [], [], []
        bias, banned, logprobs = [], [], []
        for i, seq in enumerate(rows):
            p = seq.params
            temps.append(p.temperature)
            top_k.append(p.top_k if p.top_k > 0 else vocab_size)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            seeds.append(seq.seed & _MASK32)
            steps.append(seq.num_output_tokens)
            freq.append(p.frequency_penalty)
            pres.append(p.presence_penalty)
            rep.append(p.repetition_penalty)
            if p.logit_bias:
                ids = [t for t in p.logit_bias if 0 <= t < vocab_size]
                bias.append((i, ids, [p.logit_bias[t] for t in ids]))
            if seq.num_output_tokens < p.min_tokens:
                stop_ids = list(p.stop_token_ids or []) + ([] if p.ignore_eos else list(eos_token_ids))
                if stop_ids:
                    banned.append((i, stop_ids))
            logprobs.append(-1 if p.logprobs is None else p.logprobs)
        greedy = all(t == 0.0 for t in temps)
        sampled = [j for j, t in enumerate(temps) if t > 0]
        use_pen = any(freq) or any(pres) or any(r != 1.0 for r in rep)
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32),
            top_k=torch.tensor(top_k, dtype=torch.long),
            top_p=torch.tensor(top_p, dtype=torch.float32),
            min_p=torch.tensor(min_p, dtype=torch.float32),
            seeds=torch.tensor(seeds, dtype=torch.long),
            steps=torch.tensor(steps, dtype=torch.long),
            all_greedy=greedy,
            use_top_k=any(top_k[j] < vocab_size for j in sampled),
            use_top_p=any(top_p[j] < 1.0 for j in sampled),
            use_min_p=any(min_p[j] > 0.0 for j in sampled),
            frequency=torch.tensor(freq, dtype=torch.float32) if use_pen else None,
            presence=torch.tensor(pres, dtype=torch.float32) if use_pen else None,
            repetition=torch.tensor(rep, dtype=torch.float32) if use_pen else None,
            output_tokens=[s.output_token_ids for s in rows] if use_pen else None,
            prompt_tokens=[s.token_ids[:s.num_prompt_tokens] for s in rows] if use_pen else None,
            logit_bias=bias or None,
            banned=banned or None,
            logprobs=logprobs if any(k >= 0 for k in logprobs) else None,
            extensions=[e for ext in extensions if (e := ext.prepare(rows)) is not None],
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]
    extras: dict[str, dict[int, object]] = field(default_factory=dict)   # extension name -> row -> value


@torch.inference_mode()
def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Draw one token per row. `logits` [B, V] are the step's own: extensions may edit them in
    place (the raw log-softmax, for logprobs, is taken before)."""
    logits = logits.float()
    wants_raw = batch.logprobs is not None or any(e.reads_distribution for e in batch.extensions)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_raw else None
    logits = processed_logits(logits, batch)
    if batch.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        greedy_tokens = logits.argmax(dim=-1)
        tokens = torch.where(batch.temperature == 0, greedy_tokens, draw(logits, batch))
    extras = {e.name: e.observe(raw_logprobs, tokens) for e in batch.extensions}
    return SamplerOutput(tokens.tolist(), gather_logprobs(raw_logprobs, tokens, batch.logprobs), extras)


def apply_logit_edits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.logit_bias is None and batch.banned is None:
        return logits
    logits = logits.clone()
    for row, ids, values in batch.logit_bias or ():
        logits[row, ids] += torch.tensor(values)
    for row, ids in batch.banned or ():
        logits[row, ids] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI rule for frequency/presence (on generated tokens); HF/vLLM rule for repetition.

    Only the tokens a row has seen (its prompt and output) change, so only they are touched (in
    place: the sampler's working copy) — a dense [B, V] count costs more than the forward at
    batch 64 on a 150k vocabulary. The arithmetic per token is the dense rule's."""
    if batch.frequency is None:
        return logits
    vocab = logits.shape[1]
    out_keys = _keys(batch.output_tokens, vocab)
    seen = torch.unique(torch.cat([out_keys, _keys(batch.prompt_tokens, vocab)]))
    if not len(seen):
        return logits
    generated, times = torch.unique(out_keys, return_counts=True)
    counts = torch.zeros(len(seen))
    counts[torch.searchsorted(seen, generated)] = times.to(torch.float32)
    rows, tokens = seen // vocab, seen % vocab
    values = logits[rows, tokens]
    rep = batch.repetition[rows]
    values = torch.where(values > 0, values / rep, values * rep)
    logits[rows, tokens] = values - batch.frequency[rows] * counts - batch.presence[rows] * (counts > 0)
    return logits


def processed_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The logits a row draws from: logit_bias and min_tokens masks, the extensions' edits, then
    penalties (in place where it can)."""
    logits = apply_logit_edits(logits, batch)
    for extension in batch.extensions:
        logits = extension.edit_logits(logits)
    return apply_penalties(logits, batch)


@torch.inference_mode()
def ranked_candidates(logits: torch.Tensor, batch: SamplingBatch, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `width` best tokens by its own draw, best first, and their sampling
    probabilities ([B, width] each): a greedy row's likeliest tokens; a sampled row's race winners
    under its noise, so the first is the token `sample` draws (what a token tree's draft expands)."""
    logits = processed_logits(logits.float(), batch)
    probs = sampling_probs(logits, batch)
    score = probs
    if not batch.all_greedy:
        raced = probs / exponential_noise(batch.seeds, batch.steps, probs.shape[-1])
        score = torch.where((batch.temperature > 0)[:, None], raced, probs)
    index = score.topk(min(width, probs.shape[-1]), dim=-1).indices
    return index, probs.gather(1, index)


def _keys(token_lists: list[list[int]], vocab: int) -> torch.Tensor:
    """row * vocab + token for every token of every row."""
    keys = [r * vocab + t for r, toks in enumerate(token_lists) for t in toks]
    return torch.tensor(keys, dtype=torch.long)


def draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Each row's draw from its sampling distribution (temperature, top-k, top-p, min-p) [B].

    A row whose top-k / top-p cut falls among its top candidates races among those only: its other
    tokens have probability 0 and cannot win, and the noise of a token is the same function of
    (seed, step, token id) wherever it is computed — so a 150k-token softmax and noise draw are
    spared. A row's way depends on its own logits and options only, never on the batch."""
    if not (batch.use_top_k or batch.use_top_p):
        return race_argmax(sampling_probs(logits, batch), batch.seeds, batch.steps)
    temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    values, index, among = top_candidates(logits, batch.top_k, batch.top_p, batch.use_top_p, temp)
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    if bool(among.any()):
        probs = values[among].softmax(dim=-1)
        if batch.use_min_p:
            min_p = batch.min_p[among][:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = _noise_at(batch.seeds[among], batch.steps[among], index[among])
        tokens[among] = index[among].gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)
    rest = ~among
    if bool(rest.any()):
        tokens[rest] = race_argmax(sampling_probs(logits[rest], _rows(batch, rest)), batch.seeds[rest],
                                   batch.steps[rest])
    return tokens


def top_candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, use_top_p: bool,
                   temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's best tokens, scaled by its temperature, -inf past its top-k / top-p cut
    (values, index [B, K]), and whether the cut provably falls among them (a row truncating
    nothing does not)."""
    vocab = logits.shape[-1]
    limited = top_k <= TOP_CANDIDATES
    k = min(vocab, int(top_k.max()) if bool(limited.all()) else TOP_CANDIDATES)
    values, index = logits.topk(k, dim=-1)                       # sorted, best first (temperature keeps order)
    values = (values / temperature[:, None]).masked_fill(torch.arange(k)[None, :] >= top_k[:, None], float("-inf"))
    among = top_k <= k
    if use_top_p:
        # probabilities within a row's top-k set; without a top-k, of the whole row
        norm = values.logsumexp(dim=-1)
        if not bool(among.all()):
            norm = torch.where(among, norm, (logits / temperature[:, None]).logsumexp(dim=-1))
        probs = (values - norm[:, None]).exp()
        values = values.masked_fill(probs.cumsum(dim=-1) - probs > top_p[:, None], float("-inf"))
        among |= probs.sum(dim=-1) >= top_p
    return values, index, among & ~((top_k >= vocab) & (top_p >= 1.0))


def _rows(batch: SamplingBatch, rows: torch.Tensor) -> SamplingBatch:
    """The sampling parameters of some rows (the tensors the probabilities read)."""
    import dataclasses

    return dataclasses.replace(batch, temperature=batch.temperature[rows], top_k=batch.top_k[rows],
                               top_p=batch.top_p[rows], min_p=batch.min_p[rows], seeds=batch.seeds[rows],
                               steps=batch.steps[rows])


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p (greedy rows get temperature 1)."""
    temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    logits = logits / temp[:, None]
    if batch.use_top_k or batch.use_top_p:
        logits = truncate(logits, batch.top_k, batch.top_p, batch.use_top_p)
    probs = logits.softmax(dim=-1)
    if batch.use_min_p:
        threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


TOP_CANDIDATES = 1024     # rows are cut among their top tokens when the cut provably falls there


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, use_top_p: bool) -> torch.Tensor:
    """Logits with -inf past each row's top-k and top-p cut (top-p over the renormalised top-k).

    Sorting a 150k vocabulary for every row costs more than a step's forward at batch 64, and the
    cut almost always falls among a row's first few tokens: rows are cut among their top
    candidates (`top_candidates`) whenever the cut provably falls there; only the others are
    sorted whole. Rows that truncate nothing stay as they are."""
    values, index, among = top_candidates(logits, top_k, top_p, use_top_p, torch.ones(logits.shape[0]))
    out = torch.full_like(logits, float("-inf")).scatter_(-1, index, values)
    untouched = (top_k >= logits.shape[-1]) & (top_p >= 1.0)
    if bool(untouched.any()):
        out[untouched] = logits[untouched]
    slow = ~among & ~untouched
    if bool(slow.any()):
        out[slow] = _truncate_by_sort(logits[slow], top_k[slow], top_p[slow])
    return out


def _truncate_by_sort(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1])[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before > top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def race_argmax(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The draw: argmax over tokens of probs / Exp(1) noise, per row [B]. The native kernel
    (`ponder/kernels/sampling.c`) computes the same tokens without building the [B, V] noise."""
    native = _native_race()
    if native is None or probs.dtype != torch.float32 or probs.is_cuda:
        return (probs / exponential_noise(seeds, steps, probs.shape[-1])).argmax(dim=-1)
    probs, seeds, steps = probs.contiguous(), seeds.contiguous(), steps.contiguous()
    tokens = torch.empty(probs.shape[0], dtype=torch.long)
    native(probs.data_ptr(), seeds.data_ptr(), steps.data_ptr(), tokens.data_ptr(), probs.shape[0], probs.shape[1])
    return tokens


@cache
def _native_race():
    return kernels.bind("sampling", "race_argmax", [kernels.PTR] * 4 + [kernels.I64] * 2)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, V], a pure function of (seed, step, token id)."""
    return _noise_at(seeds, steps, torch.arange(vocab, dtype=torch.long)[None, :])


def _noise_at(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The Exp(1) noise of the given token ids [B, K] (or [1, V]) of each row."""
    row_key = _mix32(_mix32(seeds) ^ (steps & _MASK32))[:, None]
    token_key = (token_ids * 0x9E3779B9) & _MASK32
    bits = _mix32(row_key ^ token_key)
    uniform = (bits.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    return (-torch.log(uniform)).to(torch.float32)


def gather_logprobs(raw_logprobs: torch.Tensor | None, tokens: torch.Tensor,
                    wanted: list[int] | None) -> list[Logprob | None]:
    if raw_logprobs is None or wanted is None:
        return [None] * tokens.shape[0]
    k = max(wanted)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k > 0 else (None, None)
    out: list[Logprob | None] = []
    for row, want in enumerate(wanted):
        if want < 0:
            out.append(None)
            continue
        top = {}
        if want > 0:
            top = dict(zip(top_ids[row, :want].tolist(), top_vals[row, :want].tolist()))
        out.append(Logprob(int(tokens[row]), chosen[row], top))
    return out
