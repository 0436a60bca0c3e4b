"""Unset sampling fields take the engine's sampling_defaults: the model's recommended sampling
(generation_config.json, GGUF general.sampling.*) over ponder's; in LLM, the CLI, the server and think."""

from __future__ import annotations

import json
import os

import gguf
import pytest

from ponder import LLM, SamplingParams
from ponder.cli import build_parser, sampling_params
from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.model.gguf import _recommended_sampling
from ponder.sampling_params import PONDER_SAMPLING_DEFAULTS
from ponder.server.protocol import ChatCompletionRequest, CompletionRequest, EngineLimits
from tests.conftest import tiny_config, tiny_model, write_hf_folder

RECOMMENDED = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def recommending_folder(tmp_path_factory) -> str:
    cfg = tiny_config()
    folder = write_hf_folder(tiny_model(cfg), cfg, str(tmp_path_factory.mktemp("tiny_hf")))
    json.dump({**RECOMMENDED, "do_sample": True, "bos_token_id": 1},
              open(os.path.join(folder, "generation_config.json"), "w"))
    return folder


@pytest.mark.parametrize("source, want", [("model", {**PONDER_SAMPLING_DEFAULTS, **RECOMMENDED}),
                                          ("ponder", PONDER_SAMPLING_DEFAULTS), ("none", {})])
def test_engine_defaults_follow_the_source(recommending_folder, tmp_path, source, want):
    engine = LLMEngine(EngineConfig(model=recommending_folder, cache_dir=str(tmp_path), num_kv_blocks=16,
                                    sampling_defaults=source))
    assert engine.sampling_defaults == want
    llm = LLM.from_engine(engine)
    params = llm.default_sampling_params()
    assert (params.temperature, params.top_k) == (want.get("temperature", 1.0), want.get("top_k", -1))


def test_gguf_sampling_keys_are_the_recommendation(tmp_path):
    path = str(tmp_path / "s.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_float32("general.sampling.temp", 0.6)
    w.add_int32("general.sampling.top_k", 20)
    w.add_float32("general.sampling.top_p", 0.95)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = _recommended_sampling(gguf.GGUFReader(path))
    assert got == {"temperature": pytest.approx(0.6), "top_k": 20, "top_p": pytest.approx(0.95)}


def test_given_fields_win_over_defaults():
    defaults = {**PONDER_SAMPLING_DEFAULTS, **RECOMMENDED}
    p = SamplingParams.with_defaults(defaults, temperature=0.0, top_k=None, max_tokens=5)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens) == (0.0, 20, 0.8, 1.05, 5)


def test_cli_flags_override_the_engine_defaults(make_tiny_engine):
    llm = LLM.from_engine(make_tiny_engine())
    unset = sampling_params(build_parser().parse_args(["generate", "hi"]), llm)
    assert (unset.temperature, unset.top_k, unset.top_p, unset.min_p) == (0.8, 40, 0.95, 0.05)
    given = sampling_params(build_parser().parse_args(["generate", "hi", "--temperature", "0", "--top-k", "5"]), llm)
    assert (given.temperature, given.top_k, given.top_p) == (0.0, 5, 0.95)


@pytest.mark.parametrize("body_type, body", [(CompletionRequest, {"prompt": "x"}),
                                             (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})])
def test_server_bodies_take_the_defaults_for_unset_fields(body_type, body):
    limits = EngineLimits(1024, 100, 8, {**PONDER_SAMPLING_DEFAULTS, **RECOMMENDED})
    unset = body_type(**body).sampling_params([[1, 2]], limits)
    assert (unset.temperature, unset.top_k, unset.repetition_penalty) == (0.7, 20, 1.05)
    given = body_type(**body, temperature=1.0, top_p=1.0).sampling_params([[1, 2]], limits)
    assert (given.temperature, given.top_p, given.top_k) == (1.0, 1.0, 20)


def test_think_takes_the_engine_defaults(make_tiny_engine):
    from ponder.think.run import start_think

    engine = make_tiny_engine(sampling_defaults="ponder")
    run = start_think(engine, [1, 2, 3], "parallel", n=1, chat=False, max_tokens=2)
    params = run.session.params
    run.abort()
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.max_tokens) == (0.8, 40, 0.95, 0.05, 2)
