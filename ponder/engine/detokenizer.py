"""Incremental detokenization and stop conditions.

Text is decoded over a small sliding window of tokens (prefix_offset..end), and a delta is only
emitted once it no longer ends in an incomplete UTF-8 character, so characters split across
tokens come out whole. Stop strings are searched only in the newly decoded tail (plus the
overlap a stop string could straddle), so a stop string split across tokens is found.
"""

from __future__ import annotations

from ponder.engine.sequence import Sequence
from ponder.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5   # prompt tokens decoded with the first output tokens (leading-space handling)


def init_detokenizer(seq: Sequence) -> None:
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(seq.num_prompt_tokens - _PROMPT_CONTEXT, 0)


def process_token(seq: Sequence, token: int, tokenizer: Tokenizer, eos_token_ids: list[int],
                  max_model_len: int) -> None:
    """Append `token` to `seq`, extend its text, and set finish_reason if a stop condition holds.

    In a program's step (`seq.control`), a step delimiter or the step's token limit sets
    `seq.control.stop_reason` instead: the engine then parks the sequence.
    """
    params = seq.params
    seq.token_ids.append(token)
    n_out = seq.num_output_tokens
    may_stop = n_out > params.min_tokens   # the sampler masked stop tokens before that
    if may_stop and ((not params.ignore_eos and token in eos_token_ids)
                     or (params.stop_token_ids and token in params.stop_token_ids)):
        seq.finish_reason, seq.stop_reason = "stop", token
        return
    old_len = len(seq.text)
    _decode_delta(seq, tokenizer, params.skip_special_tokens)
    if params.stop_strings and may_stop and len(seq.text) > old_len:
        if _check_stop_strings(seq, old_len):
            return
    if (params.max_tokens is not None and n_out >= params.max_tokens) or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
    elif seq.control is not None:
        _check_step_end(seq, token, old_len)


def append_tokens(seq: Sequence, token_ids: list[int], tokenizer: Tokenizer) -> None:
    """Force `token_ids` onto `seq` (think.append): they join the text and are computed, not sampled."""
    seq.token_ids.extend(token_ids)
    _decode_delta(seq, tokenizer, seq.params.skip_special_tokens)


def _check_step_end(seq: Sequence, token: int, old_len: int) -> None:
    """The delimiter stays in the text (the text keeps matching the tokens, whose KV stays)."""
    step = seq.control
    if token in step.stop_token_ids:
        step.stop_reason = token
        return
    for stop in step.stop:
        if seq.text.find(stop, max(step.text_start, old_len - len(stop) + 1)) != -1:
            step.stop_reason = stop
            return
    if step.max_tokens is not None and seq.num_output_tokens - step.start >= step.max_tokens:
        step.stop_reason = "length"


def _decode_delta(seq: Sequence, tokenizer: Tokenizer, skip_special: bool) -> None:
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special)
    full_text = tokenizer.decode(ids[seq.prefix_offset:], skip_special)
    if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
        seq.text += full_text[len(prefix_text):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def _check_stop_strings(seq: Sequence, old_len: int) -> bool:
    params = seq.params
    best = None
    for stop in params.stop_strings:
        idx = seq.text.find(stop, max(0, old_len - len(stop) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return False
    idx, stop = best
    seq.text = seq.text[:idx + len(stop)] if params.include_stop_str_in_output else seq.text[:idx]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True
