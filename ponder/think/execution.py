"""Strategies that run code the model writes, in the sandbox (think/sandbox.py): program-of-thought
voting (PAL) for math, and selection by agreement on the prompt's examples (CodeT-style) for code."""

from __future__ import annotations

import math
import re

from ponder.sampling_params import InvalidOption
from ponder.think.primitives import Gen, ThinkSession
from ponder.think.result import Candidate, ThinkResult
from ponder.think.strategies import _ballots, _in_waves, _positive, _prepare, _sample, _scores, _voted
from ponder.think.voting import tally


def program_of_thought(s: ThinkSession, n: int = 8, timeout: float = 5.0, scorer=None, wave: int | None = None,
                       confidence: float = 0.95, stopping: str = "beta") -> Gen[ThinkResult]:
    """Program-of-thought voting (PAL): each of n samples is a Python program (its last ```python
    block, else its whole text); the sandbox runs them all at once, and the last number each
    prints is its vote. A program that fails, times out or prints no number casts none; so does
    one cut at max_tokens. The prompt asks for the program (the caller's part). A `scorer` scores
    each program's trace (the candidates' scores; the vote stays one per program). With `wave`,
    the programs come in waves and stop as adaptive consistency does (the same `stopping` rule at
    `confidence`), drawing the first samples of the n-sample pool (the same seeds)."""
    from ponder.think.sandbox import SandboxLimits

    n = _positive(n, "n")
    wave = n if wave is None else _positive(wave, "wave")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        raise InvalidOption("timeout", f"timeout must be in (0, 60] seconds, got {timeout!r}")
    scorer = _prepare(s, scorer)
    limits = SandboxLimits(wall_s=float(timeout), cpu_s=max(1, math.ceil(timeout)))

    def judge(branches) -> Gen[list[Candidate]]:
        scores = yield from _scores(s, branches, scorer)
        answers = run_programs([program_text(b.text) for b in branches], limits)
        s.extra_usage["sandbox_runs"] += len(branches)
        return [Candidate(b.text, answer, score, b.finish_reason, b.num_output_tokens)
                for b, answer, score in zip(branches, answers, scores)]

    candidates = yield from _in_waves(s, n, wave, confidence, judge, stopping)
    if wave < n:
        s.emit("stopped", samples=len(candidates), of=n)
    return _voted("program-of-thought", candidates, tally(_ballots(candidates)))


def run_programs(programs: list[str], limits) -> list[str | None]:
    """The last number each program prints, run in the sandbox all at once (the engine waits for
    them: at most the wall-clock limit); None where one fails, times out or prints no number."""
    from concurrent.futures import ThreadPoolExecutor

    from ponder.think.sandbox import run_python

    with ThreadPoolExecutor(max(1, min(len(programs), 8))) as pool:
        runs = list(pool.map(lambda program: run_python(program, limits=limits), programs))
    return [extract_last_number_answer(run.stdout) if run.ok else None for run in runs]


def program_text(text: str) -> str:
    """The program in a reply: its last fenced ```python (or bare ```) block; else what follows an
    opening fence never closed (the reply ended inside the block); else all of it."""
    import re

    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", text, flags=re.DOTALL)
    if blocks:
        return blocks[-1]
    unclosed = re.search(r"```(?:python|py)?[ \t]*\n(.*)\Z", text, flags=re.DOTALL)
    return unclosed.group(1) if unclosed else text


def extract_last_number_answer(stdout: str) -> str | None:
    from ponder.think.answers import extract_last_number, normalize_answer

    number = extract_last_number(stdout)
    return normalize_answer(number) if number else None


def execution_selection(s: ThinkSession, n: int = 8, timeout: float = 5.0, style: str = "completion") -> Gen[ThinkResult]:
    """Code by agreement (CodeT-style, on the prompt's own examples): n candidate programs run in the
    sandbox on the `>>> call` examples of the prompt's docstring; candidates that behave alike (the
    same results on every example) form a group, and the group that passes the most examples,
    then the largest, wins. `style`: "completion" (the prompt is the function's signature and
    docstring, the sample its body) or "instruct" (the sample is a reply holding the code)."""
    from ponder.think.sandbox import SandboxLimits

    n = _positive(n, "n")
    if style not in ("completion", "instruct"):
        raise InvalidOption("style", f"style must be 'completion' or 'instruct', got {style!r}")
    examples = docstring_examples(s.prompt_text)
    branches = yield from _sample(s, n)
    programs = [(s.prompt_text + b.text) if style == "completion" else program_text(b.text) for b in branches]
    limits = SandboxLimits(wall_s=float(timeout), cpu_s=max(1, math.ceil(timeout)))
    behaviours = behaviours_on_examples(programs, examples, limits)
    s.extra_usage["sandbox_runs"] += len(programs)
    chosen_index, groups = choose_by_behaviour(behaviours, examples)
    candidates = [Candidate(b.text, None, float(examples_passed(beh, examples)) if beh else -1.0,
                            b.finish_reason, b.num_output_tokens)
                  for b, beh in zip(branches, behaviours)]
    best = groups[behaviours[chosen_index]]
    chosen = candidates[chosen_index]
    return ThinkResult("execution-selection", chosen.text, None, candidates,
                       metrics={"groups": len(groups), "examples": len(examples), "chosen_group": len(best)})


# `call => result` lines of a docstring, in the arrows HumanEval's prompts use besides doctest's
_ARROW_EXAMPLE = re.compile(r"^\s*(?:\*\s*)?([A-Za-z_]\w*\(.*\))\s*(?:==>|=>|➞|==|->)\s*(\S.*?)\s*$")


def docstring_examples(prompt: str) -> list[tuple[str, str]]:
    """(call, expected result) pairs of the prompt's examples: doctest's `>>> call` lines and the
    line after each, and `call ==> result` lines (also `=>`, `➞`, `==`, `->`) that call a function
    the prompt defines."""
    defined = set(re.findall(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", prompt, flags=re.MULTILINE))
    lines = prompt.splitlines()
    found = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>> "):
            after = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if after and not after.startswith(">>>"):
                found.append((stripped[4:], after))
        elif (match := _ARROW_EXAMPLE.match(line)) and match.group(1).split("(")[0] in defined:
            found.append((match.group(1), match.group(2)))
    return found


def examples_passed(behaviour: tuple, examples: list[tuple[str, str]]) -> int:
    """How many examples a behaviour (the reprs of its results) gets right: compared as Python
    values where both sides parse as literals (so `6.00` matches 6.0, `true` True), else as text."""
    return sum(_same_value(got, want) for got, (_, want) in zip(behaviour, examples))


def _same_value(got: str, want: str) -> bool:
    import ast

    want = {"true": "True", "false": "False", "null": "None", "none": "None"}.get(want.lower(), want)
    try:
        return ast.literal_eval(got) == ast.literal_eval(want)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return got.strip() == want.strip()


def behaviours_on_examples(programs: list[str], examples: list[tuple[str, str]], limits) -> list[tuple]:
    """Each program's behaviour on the examples (see `_behaviour`), run in the sandbox in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from ponder.think.sandbox import run_python

    with ThreadPoolExecutor(max(1, min(len(programs), 8))) as pool:
        return list(pool.map(lambda p: _behaviour(p, examples, limits, run_python), programs))


def choose_by_behaviour(behaviours: list[tuple], examples: list[tuple[str, str]]) -> tuple[int, dict]:
    """The candidate CodeT-style agreement picks: candidates that behave alike form a group; the group
    that passes the most examples, then the largest, then the earliest wins; its first member is
    chosen. Returns (its index, the groups: behaviour -> member indices)."""
    groups: dict[tuple, list[int]] = {}
    for i, behaviour in enumerate(behaviours):
        groups.setdefault(tuple(behaviour), []).append(i)

    def rank(item):
        behaviour, members = item
        return (examples_passed(behaviour, examples) if behaviour else -1, len(members), -members[0])
    _, best = max(groups.items(), key=rank)
    return best[0], groups


def _behaviour(program: str, examples: list[tuple[str, str]], limits, run_python) -> tuple:
    """What the program gives on each example (the repr of each result, or "error"); () when it
    does not even run."""
    import json

    calls = json.dumps([call for call, _ in examples])
    script = (program + "\n\nimport json as _json\n_out = []\nfor _call in _json.loads(" + repr(calls) + "):\n"
              "    try:\n        _out.append(repr(eval(_call)))\n    except Exception:\n"
              "        _out.append('error')\nprint(_json.dumps(_out))\n")
    run = run_python(script, limits=limits)
    if not run.ok:
        return ()
    try:
        return tuple(json.loads(run.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return ()
