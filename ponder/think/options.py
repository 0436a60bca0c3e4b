"""Every option a strategy takes, declared once: its type on a command line, its help, and the
check of a value that arrives from outside Python (the CLI, the server's `ponder` object). Which
strategy takes which option, and its default, is the strategy function's signature.

A failed check raises InvalidOption naming the option, so each surface can point at its own
spelling of the field (`--width`, `ponder.width`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ponder.sampling_params import InvalidOption
from ponder.think.scorers import SCORER_NAMES
from ponder.think.stopping import STOPPING_RULES
from ponder.think.catalog import STRATEGIES

MAX_BRANCHES = 1024            # most branches one option (n, warmup) may ask for


def _count(name: str, value, high: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOption(name, f"{name} must be a positive integer, got {value!r}")
    if high is not None and value > high:
        raise InvalidOption(name, f"{name} must be <= {high}, got {value}")
    return value


def _branches(name: str, value):
    return _count(name, value, MAX_BRANCHES)


def _count_or_null(name: str, value):
    return None if value is None else _count(name, value)


def _top_logprobs(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise InvalidOption(name, f"{name} must be an integer in [0, 20], got {value!r}")
    return value


def _number(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOption(name, f"{name} must be a number, got {value!r}")
    return value


def _string(name: str, value):
    if not isinstance(value, str):
        raise InvalidOption(name, f"{name} must be a string, got {value!r}")
    return value


def _scorer(name: str, value):
    if value is not None and value not in SCORER_NAMES:
        raise InvalidOption(name, f"{name} must be one of {', '.join(SCORER_NAMES)} (or null), got {value!r}")
    return value


def _reference(name: str, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise InvalidOption(name, f"{name} must be the expected answer (a string or a number), got {value!r}")
    return value


def _delimiter(name: str, value):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(d, str) and d for d in items):
        raise InvalidOption(name, f"{name} must be a non-empty string or a list of them, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class StrategyOption:
    name: str
    check: Callable[[str, Any], Any]     # (name, value) -> the value to pass, or InvalidOption
    kind: type | None                    # its type on a command line (None: not offered there)
    help: str
    choices: tuple[str, ...] | None = None


OPTIONS = {o.name: o for o in [
    StrategyOption("n", _branches, int, "branches / samples / beams / particles"),
    StrategyOption("warmup", _branches, int, "deepconf: warm-up traces"),
    StrategyOption("width", _count, int, "beam search: beam width M (keep n/M)"),
    StrategyOption("max_steps", _count, int, "beam search, particle filtering: most steps"),
    StrategyOption("step_max_tokens", _count_or_null, int, "tokens one step may generate"),
    StrategyOption("window", _count, int, "deepconf: tokens per confidence group"),
    StrategyOption("top_logprobs", _top_logprobs, None, "logprobs a confidence scorer reads per token"),
    StrategyOption("keep_top", _number, float, "deepconf: 0.9 (high) or 0.1 (low)"),
    StrategyOption("consensus", _number, float, "deepconf: vote share that stops all"),
    StrategyOption("wave", _count, int, "adaptive consistency, program of thought: samples drawn at a "
                                        "time (program of thought: all at once unless set)"),
    StrategyOption("vote_temperature", _number, float, "self-consistency weighted: softmax temperature of the "
                                                       "scores (CISC)"),
    StrategyOption("timeout", _number, float, "program of thought, execution selection: seconds a program may run"),
    StrategyOption("style", _string, str, "execution selection: how a sample holds its code",
                   ("completion", "instruct")),
    StrategyOption("confidence", _number, float, "adaptive consistency, program of thought in waves: "
                                                 "posterior that the leading answer leads, to stop"),
    StrategyOption("stopping", _string, str, "adaptive consistency, program of thought in waves: when sampling "
                                             "stops (think/stopping.py)", STOPPING_RULES),
    StrategyOption("vote", _string, str, "self-consistency: how answers are counted", ("majority", "weighted")),
    StrategyOption("scorer", _scorer, str, ", ".join(SCORER_NAMES)),
    StrategyOption("reference", _reference, str, "parallel: the right answer, for pass@k"),
    StrategyOption("delimiter", _delimiter, None, "what ends a step"),
]}


def options_of(strategy: str) -> list[str]:
    """The declared options the strategy takes (its signature's, in order)."""
    return [p for p in inspect.signature(STRATEGIES[strategy]).parameters if p in OPTIONS]


def check_option(name: str, value):
    """The value checked as the option's declaration says (raises InvalidOption)."""
    return OPTIONS[name].check(name, value)
