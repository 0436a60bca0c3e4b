"""Answer extraction, normalisation, votes and pass@k."""

import math

import pytest

from ponder.think.answers import (answers_equal, extract_after_hashes, extract_answer, extract_boxed,
                                  normalize_answer)
from ponder.think.voting import pass_at_k, tally, winner


@pytest.mark.parametrize("text, expected", [
    ("so the total is \\boxed{18}.", "18"),
    ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\text{\\$1,250.00}}", "1250"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is: 42 apples.", "42"),
    ("5 + 7 = 12, so she has 12 left", "12"),
    ("The answer is 3/4", "0.75"),
    ("\\boxed{50\\%}", "50"),
    ("-3.50 degrees", "-3.5"),
    ("no number here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_boxed_braces_and_hashes():
    assert extract_boxed("\\boxed{x^{2}+1}") == "x^{2}+1"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_after_hashes("work\n#### 1,000\n") == "1,000"


def test_normalisation_and_numeric_equivalence():
    assert normalize_answer("$18.00") == normalize_answer("18") == "18"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer(" Paris. ") == "paris"
    assert answers_equal("0.333333333", "1/3", rel_tol=1e-6)
    assert answers_equal("\\frac{6}{4}", "1.5")
    assert not answers_equal("18", "19") and not answers_equal(None, "1")


def test_tally_and_winner():
    votes = tally(["18", "7", "18", None, "7", "7"])
    assert votes == {"18": 2.0, "7": 3.0} and winner(votes) == "7"
    weighted = tally(["18", "7", "7"], [5.0, 1.0, 1.0])
    assert winner(weighted) == "18"
    assert winner(tally(["a", "b"])) == "a"          # ties: first seen
    assert winner({}) is None


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 4), (8, 8, 2), (16, 5, 16)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


@pytest.mark.parametrize("text, answer", [
    (r"so the total is \boxed{18 \text{ dollars}}", "18"),
    (r"\boxed{x = 18}", "18"),
    (r"\boxed{3.5 hours}", "3.5"),
    ("Final answer = 12 cm", "12"),
    ("The answer is: yes", "yes"),
    ("x=7 apples", "7"),
])
def test_units_and_assignments_are_stripped(text, answer):
    assert extract_answer(text) == answer


def test_a_sentence_after_answer_is_not_an_answer():
    assert extract_answer("so the answer would be that we need to ask again") is None


def test_a_truncated_sample_does_not_vote():
    from ponder.think.result import Candidate
    from ponder.think.strategies import _ballots

    pool = [Candidate("... 7", "7", finish_reason="length"), Candidate("... 7", "7", finish_reason="length"),
            Candidate(r"\boxed{12}", "12", finish_reason="stop"), Candidate("no idea", None, finish_reason="stop")]
    assert _ballots(pool) == [None, None, "12", None]
    assert winner(tally(_ballots(pool))) == "12"
