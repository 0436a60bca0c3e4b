"""Every strategy, by name (what LLM.think, `ponder think` and the server's `ponder` object accept)."""

from __future__ import annotations

from ponder.think.execution import execution_selection, program_of_thought
from ponder.think.strategies import (adaptive_consistency, beam_search, best_of_n, deepconf, greedy, parallel,
                                     particle_filtering, self_consistency)

STRATEGIES = {
    "greedy": greedy,
    "parallel": parallel,
    "self-consistency": self_consistency,
    "adaptive-consistency": adaptive_consistency,
    "program-of-thought": program_of_thought,
    "execution-selection": execution_selection,
    "best-of-n": best_of_n,
    "deepconf": deepconf,
    "beam-search": beam_search,
    "particle-filtering": particle_filtering,
}
