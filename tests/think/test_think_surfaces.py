"""LLM.think, the server helpers, the CLI parser, and one run on a real model."""

import json

import pytest

from ponder import SamplingParams
from ponder.cli import build_parser
from ponder.llm import LLM
from ponder.server.think import chat_completion_response, think_options_from_body
from ponder.think import run_think_request, start_think_request
from ponder.think.cli import think_options

PROMPT = list(range(40, 70))


def test_llm_think_single_and_batch(make_tiny_engine):
    engine = make_tiny_engine()
    llm = LLM.from_engine(engine)
    one = llm.think(PROMPT, "self-consistency", n=4, max_tokens=8, seed=1)
    assert len(one.candidates) == 4 and isinstance(one.answer, str)
    assert set(one.usage) == {"prompt_tokens_computed", "prompt_tokens_cached", "generated_tokens",
                              "scorer_calls"}
    many = llm.think(["hello", "world!"], "best-of-n", n=2, scorer="confidence", max_tokens=6, chat=False)
    assert [len(r.candidates) for r in many] == [2, 2]
    assert all(c.score is not None for r in many for c in r.candidates)
    chat = llm.think([{"role": "user", "content": "hi"}], "greedy", max_tokens=5)
    assert chat.num_prompt_tokens > 10                       # rendered with the chat template
    assert not engine.has_unfinished_requests()
    engine.pool.check_empty()


def test_bad_options_are_rejected_before_anything_runs(make_tiny_engine):
    engine = make_tiny_engine()
    llm = LLM.from_engine(engine)
    with pytest.raises(ValueError, match="unknown strategy"):
        llm.think(PROMPT, "tree-of-thought")
    with pytest.raises(ValueError, match="unknown option"):
        llm.think(PROMPT, "greedy", n=4)
    with pytest.raises(ValueError, match="vote"):
        llm.think(PROMPT, "self-consistency", vote="loudest")
    with pytest.raises(ValueError, match="temperature"):
        llm.think(PROMPT, "parallel", temperature=-1)
    with pytest.raises(ValueError, match="unknown scorer"):
        llm.think(PROMPT, "best-of-n", scorer="vibes")
    assert not engine.has_unfinished_requests()
    engine.pool.check_empty()


def test_a_think_request_sets_its_repetition_penalty_for_every_branch(make_tiny_engine):
    engine = make_tiny_engine()
    engine.sampling_defaults = {**engine.sampling_defaults, "repetition_penalty": 3.0}   # a model's default
    llm = LLM.from_engine(engine)
    ids = list(range(1, 12))
    plain = {rp: llm.generate([ids], SamplingParams(temperature=0, max_tokens=10, repetition_penalty=rp))[0]
             for rp in (1.0, 3.0)}
    assert plain[1.0].outputs[0].text != plain[3.0].outputs[0].text
    assert llm.think(ids, "greedy", max_tokens=10).answer == plain[3.0].outputs[0].text           # the default
    assert llm.think(ids, "greedy", max_tokens=10, repetition_penalty=1.0).answer == plain[1.0].outputs[0].text
    engine.pool.check_empty()


def test_server_helpers(make_tiny_engine):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 6,
            "temperature": 0.5, "repetition_penalty": 1.1, "ponder": {"strategy": "self-consistency", "n": 3}}
    strategy, options = think_options_from_body(body)
    assert strategy == "self-consistency"
    assert options == {"n": 3, "temperature": 0.5, "repetition_penalty": 1.1, "max_tokens": 6}
    engine = make_tiny_engine()
    result = run_think_request(engine, body["messages"], {"strategy": strategy, **options})
    response = chat_completion_response(result, "tiny", "chatcmpl-1")
    json.dumps(response)
    assert response["choices"][0]["message"]["content"] == result.answer
    assert response["usage"]["completion_tokens"] == result.usage["generated_tokens"] == 18
    assert response["ponder"]["usage"] == result.usage and len(response["ponder"]["candidates"]) == 3
    with pytest.raises(ValueError):
        think_options_from_body({"ponder": "sc"})
    engine.pool.check_empty()


def test_think_runs_inside_an_engine_loop_with_other_requests(make_tiny_engine):
    engine = make_tiny_engine()
    plain = engine.add_request(list(range(1, 20)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    runs = [start_think_request(engine, [{"role": "user", "content": q}],
                                {"strategy": "beam-search", "n": 4, "width": 2, "scorer": "confidence-tail",
                                 "step_max_tokens": 3, "max_steps": 3, "max_tokens": 20})
            for q in ("a?", "b?")]
    events = []
    while not all(run.done for run in runs) or engine.has_unfinished_requests():
        engine.step()                         # the loop the server runs: step, then advance each run
        for run in runs:
            run.advance()
            events += run.drain_events()
    assert plain.seqs[0].num_output_tokens == 30
    assert all(run.result.error is None and len(run.result.candidates) == 4 for run in runs)
    assert sum(e["event"] == "beam-step" for e in events) == 6
    engine.pool.check_empty()


def test_a_failing_think_request_ends_alone(make_tiny_engine):
    engine = make_tiny_engine()

    def broken(session, seqs):
        raise RuntimeError("scorer exploded")

    bad = start_think_request(engine, [{"role": "user", "content": "x"}],
                              {"strategy": "best-of-n", "n": 2, "scorer": broken, "max_tokens": 4})
    good = start_think_request(engine, [{"role": "user", "content": "y"}],
                               {"strategy": "self-consistency", "n": 2, "max_tokens": 4})
    aborted = start_think_request(engine, [{"role": "user", "content": "z"}],
                                  {"strategy": "self-consistency", "n": 2, "max_tokens": 40})
    engine.step()
    aborted.advance()
    aborted.abort()
    while not (bad.done and good.done):
        engine.step()
        bad.advance()
        good.advance()
    assert "scorer exploded" in bad.result.error and good.result.error is None
    assert aborted.result.error == "aborted"
    assert not engine.has_unfinished_requests()
    engine.pool.check_empty()


def test_cli_parses_think():
    args = build_parser().parse_args(["think", "What is 6*7?", "--strategy", "self-consistency", "-n", "8"])
    assert args.func.__name__ == "cmd_think"
    assert think_options(args) == {"n": 8, "max_tokens": 512}   # sampling: the engine's sampling_defaults
    args = build_parser().parse_args(["think", "q", "--temperature", "0.5", "--top-k", "20", "--seed", "3"])
    assert think_options(args) == {"max_tokens": 512, "temperature": 0.5, "top_k": 20, "seed": 3}
    args = build_parser().parse_args(["think", "q", "--strategy", "beam", "--width", "2", "--scorer", "self-eval"])
    assert think_options(args)["width"] == 2 and args.strategy == "beam-search"   # aliases resolve at parse time


@pytest.mark.slow
def test_real_model_best_of_n_shares_the_prompt_and_self_evaluates(default_llm):
    engine = default_llm.engine
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    result = default_llm.think(question, "best-of-n", n=3, scorer="self-eval", max_tokens=8, seed=0)
    prompt_len = result.num_prompt_tokens
    assert len(result.candidates) == 3 and all(c.num_tokens <= 8 for c in result.candidates)
    assert all(0.0 < c.score < 1.0 for c in result.candidates)
    assert result.answer == max(result.candidates, key=lambda c: c.score).text
    # the prompt once (or from the prefix cache), one token per branch, then only the questions
    assert result.usage["prompt_tokens_cached"] >= 3 * (prompt_len - 1)
    assert result.usage["prompt_tokens_computed"] <= prompt_len + 3 + 3 * 40
    assert not engine.has_unfinished_requests()


def test_gsm8k_benchmark_smoke(make_tiny_engine, tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "think_gsm8k.py")
    spec = importlib.util.spec_from_file_location("think_gsm8k", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "1+1?", "answer": "so\\n#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n'
                    '{"question": "3+3?", "answer": "#### 6"}\n')
    engine = make_tiny_engine(num_kv_blocks=1024)
    out = tmp_path / "report.json"
    report = bench.main(["--data", str(data), "--limit", "2", "--budget", "4", "--max-tokens", "6",
                         "--out", str(out)], llm=LLM.from_engine(engine))
    assert report["problems"] == 2 and len(report["strategies"]) == 5
    for row in report["strategies"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["generated_tokens"] > 0 and len(row["per_problem"]) == 2
    assert json.loads(out.read_text())["strategies"].keys() == report["strategies"].keys()
    engine.pool.check_empty()


def test_strategy_spellings_resolve_alike():
    from ponder.cli import build_parser
    from ponder.think.run import strategy_name

    for spelling in ("self-consistency", "self_consistency", "Self_Consistency", "sc"):
        assert strategy_name(spelling) == "self-consistency"
        assert build_parser().parse_args(["think", "q", "--strategy", spelling]).strategy == "self-consistency"
    assert strategy_name("self consistency") is None


def test_strategy_options_are_declared_once_for_every_surface():
    """Every option a strategy's signature takes is declared (think/options.py); the CLI offers
    each declared option that has a command-line type, and checks raise InvalidOption naming it."""
    import inspect

    from ponder.cli import build_parser
    from ponder.sampling_params import InvalidOption
    from ponder.think.cli import think_options
    from ponder.think.options import OPTIONS, check_option, options_of
    from ponder.think.catalog import STRATEGIES

    for name, fn in STRATEGIES.items():
        taken = [p for p in inspect.signature(fn).parameters if p not in ("s", "extract")]
        assert options_of(name) == taken, f"{name} takes undeclared options"
    argv = ["think", "q", "-n", "3", "--width", "2", "--keep-top", "0.5", "--vote", "weighted"]
    assert {"n": 3, "width": 2, "keep_top": 0.5, "vote": "weighted"}.items() <= think_options(
        build_parser().parse_args(argv)).items()
    for name in OPTIONS:
        with pytest.raises(InvalidOption) as bad:
            check_option(name, object())
        assert bad.value.option == name
