"""DeepConf-style confidence from top-k logprobs (Fu et al., 2025, "Deep Think with Confidence").

Token confidence is the negative mean of the top-k logprobs at that position: a peaked
distribution has very negative alternatives, so high confidence. A trace's confidence is the mean,
the lowest mean over a sliding window of tokens (group confidence), or the mean of its tail.
"""

from __future__ import annotations

from ponder.outputs import Logprob

KINDS = ("mean", "min-window", "tail")


def token_confidence(logprob: Logprob) -> float:
    if not logprob.top:
        raise ValueError("confidence needs top-k logprobs (SamplingParams.logprobs >= 1)")
    return -sum(logprob.top.values()) / len(logprob.top)


class ConfidenceTrace:
    """Token confidences of one sequence, extended incrementally, with prefix sums for windows."""

    def __init__(self) -> None:
        self.prefix = [0.0]   # prefix[i] = sum of the first i token confidences

    def __len__(self) -> int:
        return len(self.prefix) - 1

    def update(self, logprobs: list[Logprob] | None) -> "ConfidenceTrace":
        for lp in (logprobs or [])[len(self):]:
            self.prefix.append(self.prefix[-1] + token_confidence(lp))
        return self

    def window_mean(self, end: int, window: int) -> float:
        start = max(0, end - window)
        return (self.prefix[end] - self.prefix[start]) / max(1, end - start)

    def mean(self) -> float:
        return self.window_mean(len(self), len(self))

    def tail(self, window: int) -> float:
        return self.window_mean(len(self), window)

    def lowest_group(self, window: int) -> float:
        """Lowest window mean; a trace shorter than the window has one group, itself."""
        n = len(self)
        if n <= window:
            return self.mean()
        return min(self.window_mean(end, window) for end in range(window, n + 1))

    def aggregate(self, kind: str, window: int) -> float:
        if kind == "mean":
            return self.mean()
        if kind == "min-window":
            return self.lowest_group(window)
        if kind == "tail":
            return self.tail(window)
        raise ValueError(f"confidence kind must be one of {', '.join(KINDS)}, got {kind!r}")


def trace_confidence(logprobs: list[Logprob] | None, kind: str = "mean", window: int = 2048) -> float:
    trace = ConfidenceTrace().update(logprobs)
    if not len(trace):
        return 0.0
    return trace.aggregate(kind, window)
