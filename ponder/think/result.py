"""What a think strategy returns: the chosen text, the candidates with scores, and usage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Candidate:
    text: str
    answer: str | None                 # extracted, normalised final answer
    score: float | None = None         # the strategy's score (higher is better), if it scores
    finish_reason: str | None = None   # "stop", "length", or why the strategy dropped it
    num_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ThinkResult:
    strategy: str
    answer: str                        # the chosen candidate's text
    final_answer: str | None           # its extracted answer (or the winning vote)
    candidates: list[Candidate]
    usage: dict = field(default_factory=dict)   # prompt_tokens_computed, prompt_tokens_cached,
                                                # generated_tokens, scorer_calls
    votes: dict[str, float] | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    error_option: str | None = None    # the option the error is about, when one is (for a 400's param)
    num_prompt_tokens: int = 0

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "answer": self.answer, "final_answer": self.final_answer,
                "candidates": [c.to_dict() for c in self.candidates], "usage": dict(self.usage),
                "votes": self.votes, "metrics": self.metrics, "error": self.error,
                "num_prompt_tokens": self.num_prompt_tokens}
