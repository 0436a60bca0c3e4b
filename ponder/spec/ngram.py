"""Prompt lookup (n-gram) proposals: the last few tokens of a sequence, found earlier in its prompt
or output, predict that what followed them then follows them again — the common case when a model
rewrites, quotes or edits text it was given.
"""

from __future__ import annotations


def propose_ngram(token_ids: list[int], num_tokens: int, min_n: int = 1, max_n: int = 3) -> list[int]:
    """Up to `num_tokens` draft tokens: those that followed the most recent earlier occurrence of
    the longest suffix (of `max_n` down to `min_n` tokens) that occurs earlier; [] if none does."""
    if num_tokens < 1:
        return []
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n:]
        first = suffix[0]
        # the latest earlier start whose n tokens equal the suffix, leaving at least one token after it
        for start in range(length - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + num_tokens]
    return []
