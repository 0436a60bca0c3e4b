"""The command line offers every engine option, generated from EngineConfig's definition."""

from __future__ import annotations

import dataclasses

import pytest

from ponder.cli import build_parser, server_config
from ponder.config import EngineConfig, engine_options

# Every command that builds an engine (`bench serve` drives servers over HTTP: --ponder-args).
COMMANDS = [["generate", "hi"], ["chat"], ["serve"], ["think", "q"], ["bench", "throughput"],
            ["bench", "single-stream"], ["bench", "tune"], ["bench", "costmodel"], ["bench", "think"]]
SETTINGS = {"dtype": ("--dtype", "bfloat16", "bfloat16"), "block_size": ("--block-size", "8", 8),
            "num_kv_blocks": ("--num-kv-blocks", "12", 12), "kv_cache_memory_gb": ("--kv-cache-memory-gb", "0.5", 0.5),
            "max_num_seqs": ("--max-num-seqs", "3", 3), "max_num_batched_tokens": ("--max-num-batched-tokens", "64", 64),
            "max_model_len": ("--max-model-len", "256", 256), "enable_prefix_caching": ("--no-prefix-caching", None, False),
            "weights": ("--weights", "q8_0", "q8_0"), "kv_cache_dtype": ("--kv-cache-dtype", "fp32", "fp32"),
            "num_threads": ("--num-threads", "1", 1), "seed": ("--engine-seed", "7", 7),
            "sampling_defaults": ("--sampling-defaults", "ponder", "ponder"),
            "speculative_method": ("--speculative-method", "draft", "draft"),
            "speculative_model": ("--speculative-model", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
            "num_speculative_tokens": ("--num-speculative-tokens", "3", 3),
            "speculative_adaptive": ("--no-speculative-adaptive", None, False),
            "speculative_tree_width": ("--speculative-tree-width", "3", 3),
            "prompt_lookup_min": ("--prompt-lookup-min", "2", 2), "prompt_lookup_max": ("--prompt-lookup-max", "5", 5),
            "speculative_disable_by_batch_size": ("--speculative-disable-by-batch-size", "2", 2),
            "cache_dir": ("--cache-dir", "/tmp/x", "/tmp/x")}


def test_settings_cover_every_engine_option():
    assert set(SETTINGS) == {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_sets_every_engine_option(command):
    argv = list(command)
    for flag, value, _ in SETTINGS.values():
        argv += [flag] if value is None else [flag, value]
    options = engine_options(build_parser().parse_args(argv))
    assert options == {name: want for name, (_, _, want) in SETTINGS.items()}
    EngineConfig.from_options(None, **options)           # all valid together


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_unset_flags_keep_the_config_defaults(command):
    args = build_parser().parse_args(command)
    defaults = {"max_num_seqs": 1} if command[-1] == "single-stream" else {}
    assert engine_options(args) == defaults


def test_engine_seed_and_request_seed_are_different_flags():
    args = build_parser().parse_args(["generate", "hi", "--seed", "3", "--engine-seed", "5"])
    assert args.seed == 3 and engine_options(args)["seed"] == 5


def test_a_bad_choice_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--weights", "q2"])


def test_allowed_origins_are_comma_separated_or_repeated():
    def origins(*argv):
        return server_config(build_parser().parse_args(["serve", *argv])).allowed_origins

    assert origins() is None
    assert origins("--allowed-origins", "https://a.example, http://localhost:3000",
                   "--allowed-origins", "*") == ["https://a.example", "http://localhost:3000", "*"]


@pytest.mark.parametrize("argv, message", [
    (["--prefill-replicas", "1"], "--prefill-replicas and --decode-replicas go together"),
    (["--replicas", "2", "--prefill-replicas", "1", "--decode-replicas", "1"], "not both"),
    (["--prefill-replicas", "1", "--decode-replicas", "0"], "--decode-replicas must be >= 1, got 0"),
    (["--router", "round-robin"], "go with --replicas N (or --prefill-replicas P --decode-replicas D)"),
    (["--replica-channel", "ray"], "go with --replicas N (or --prefill-replicas P --decode-replicas D)"),
])
def test_bad_replica_flags_are_a_clear_error_before_anything_starts(argv, message, capsys):
    from ponder.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err
