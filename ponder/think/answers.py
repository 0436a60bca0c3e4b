"""Final-answer extraction and normalisation: `\\boxed{}`, "####", "the answer is", last number.

Normalised answers are what votes count: "18", "18.0", "$18" and "\\boxed{18}" all become "18".
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?!\d*/))?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*[:=]?|[:=])\s*(.+)", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\w*\s*=\s*")                      # "x = 18"
_WITH_UNIT = re.compile(r"^(-?\$?\s*[\d,]*\.?\d+)\s*[a-zA-Z][a-zA-Z\s.]*$")   # "18 dollars", "3.5 hours"
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start == -1:
        return None
    i = text.find("{", start)
    if i == -1:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def extract_after_hashes(text: str) -> str | None:
    """GSM8K style: what follows the last "####" on its line."""
    i = text.rfind("####")
    if i == -1:
        return None
    rest = text[i + 4:].strip().splitlines()
    return rest[0].strip() if rest else None


def extract_last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised: boxed, then ####, then "answer is", then last number."""
    for extract in (extract_boxed, extract_after_hashes, _extract_answer_is):
        found = extract(text)
        if found:
            return normalize_answer(found)
    number = extract_last_number(text)
    return normalize_answer(number) if number else None


def _extract_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    tail = matches[-1].group(1).strip().splitlines()[0]
    number = extract_last_number(tail)
    if number:
        return number
    words = tail.rstrip(".").strip()
    return words if words and len(words.split()) <= 3 else None   # a phrase, not a sentence


def normalize_answer(answer: str) -> str:
    """Canonical form: LaTeX wrappers, currency, thousands separators and units stripped; numbers
    written the shortest way ("18.50" -> "18.5", "1,000" -> "1000", "\\frac{1}{2}" -> "0.5")."""
    s = answer.strip()
    s = _TEXT.sub(r"\1", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\$", "$", "^\\circ", "^{\\circ}", "\\%", "%"):
        s = s.replace(junk, "")
    s = s.strip().rstrip(".,;:!").strip()
    s = _ASSIGNMENT.sub("", s)
    unit = _WITH_UNIT.match(s)
    if unit:
        s = unit.group(1).replace(" ", "")
    value = to_number(s)
    if value is not None:
        return format_number(value)
    return " ".join(s.split()).lower()


def to_number(answer: str) -> float | None:
    """The numeric value of an answer, if it is one ("1,234.5", "-3", "3/4", "\\frac{3}{4}", "50%")."""
    s = answer.strip().replace("$", "").replace("\\$", "").rstrip("%").replace("\\%", "").strip()
    frac = _FRAC.fullmatch(s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    s = s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def answers_equal(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
    """Equal as numbers (within rel_tol) when both are numbers, else equal once normalised."""
    if a is None or b is None:
        return False
    x, y = to_number(normalize_answer(a)), to_number(normalize_answer(b))
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)
    return normalize_answer(a) == normalize_answer(b)


def exact_match(reference: str):
    """A verifier: 1.0 when a completion's extracted answer equals `reference`, else 0.0."""
    def verify(completion: str) -> float:
        return float(answers_equal(extract_answer(completion), reference))
    return verify
