"""A request's prompt as token ids, checked against what an engine can serve (add_request, and a
hand-off's import)."""

from __future__ import annotations

from ponder.engine.kv_cache import BlockPool
from ponder.model.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt, prompt_token_ids) -> tuple[str | None, list[int]]:
    """(the prompt's text if it has one, its token ids)."""
    if prompt_token_ids is not None:
        return (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, pool: BlockPool) -> None:
    """Raise ValueError naming the problem if the prompt `ids` cannot be served."""
    if not ids:
        raise ValueError("prompt is empty: give at least one token")
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt is {len(ids)} tokens, but the context is {max_model_len} tokens "
                         f"(prompt + at least one generated token)")
    need = -(-(len(ids) + 1) // pool.block_size)
    if need > pool.num_blocks:
        raise ValueError(f"prompt needs {need} KV blocks but the pool has {pool.num_blocks}")
