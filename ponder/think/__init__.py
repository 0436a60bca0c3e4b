"""Inference-time compute: primitives over the engine, scorers, strategies, answer extraction."""

from ponder.think.answers import answers_equal, exact_match, extract_answer, extract_boxed, normalize_answer
from ponder.think.primitives import ThinkSession, drive
from ponder.think.result import Candidate, ThinkResult
from ponder.think.run import ThinkPrompt, ThinkRun, run_think_request, start_think, start_think_request, think
from ponder.think.scorers import (ConfidenceScorer, RewardModelScorer, SelfEvalScorer, VerifierScorer,
                                  make_scorer)
from ponder.think.catalog import STRATEGIES
from ponder.think.voting import pass_at_k

__all__ = ["ThinkSession", "drive", "ThinkResult", "Candidate", "ThinkPrompt", "ThinkRun", "think", "start_think",
           "start_think_request", "run_think_request",
           "ConfidenceScorer", "SelfEvalScorer", "VerifierScorer", "RewardModelScorer", "make_scorer",
           "STRATEGIES", "pass_at_k", "extract_answer", "extract_boxed", "normalize_answer", "answers_equal",
           "exact_match"]
