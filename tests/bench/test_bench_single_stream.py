"""`ponder bench single-stream`: pp/tg tok/s at batch 1 on a tiny random model, llama-bench's JSON
parsed from a captured sample, the side-by-side table, and the build script's "already built" check."""

import json
import os
import subprocess
import sys

import pytest

from ponder.bench import REPO_ROOT, peers, single_stream
from ponder.bench.single_stream import StreamResult
from ponder.cli import main

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "llama_bench_sample.json")


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory) -> str:
    """A tiny random Llama saved as a Hugging Face folder with the byte-level test tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.conftest import write_byte_tokenizer

    folder = str(tmp_path_factory.mktemp("tiny_hf"))
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=258)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    write_byte_tokenizer(folder)
    return folder


def test_single_stream_reports_pp_and_tg(tiny_hf_folder, tmp_path, capsys):
    out = str(tmp_path / "single.json")
    assert main(["bench", "single-stream", "--model", tiny_hf_folder, "--pp", "16", "--tg", "6", "-r", "2",
                 "--num-kv-blocks", "16", "--weights", "fp32", "--kv-cache-dtype", "fp32", "--output", out]) == 0
    table = capsys.readouterr().out
    assert "pp16" in table and "tg6" in table and "ponder tok/s" in table
    doc = json.load(open(out))
    assert doc["command"] == "single-stream" and (doc["pp"], doc["tg"], doc["repetitions"]) == (16, 6, 2)
    machine = doc["machine"]
    assert "cpu_model" in machine and isinstance(machine["avx512_vnni"], bool)
    config = doc["config"]
    assert config["enable_prefix_caching"] is False and config["max_num_seqs"] == 1
    assert (config["weights"], config["kv_cache_dtype"]) == ("fp32", "fp32")
    assert set(doc["engine"]) == set(single_stream.ENGINE_KEYS)
    assert doc["llama.cpp"] is None
    pp, tg = doc["runs"]
    assert (pp["name"], pp["test"], pp["n_prompt"], pp["n_gen"]) == ("ponder", "pp16", 16, 0)
    assert (tg["name"], tg["test"], tg["n_prompt"], tg["n_gen"]) == ("ponder", "tg6", 0, 6)
    for run in (pp, tg):
        assert len(run["samples_ts"]) == 2 and all(v > 0 for v in run["samples_ts"])
        assert run["avg_ts"] > 0 and run["stddev_ts"] >= 0
    assert [row["test"] for row in doc["comparison"]] == ["pp16", "tg6"]


def test_single_stream_can_skip_a_test(tiny_hf_folder, capsys):
    assert main(["bench", "single-stream", "--model", tiny_hf_folder, "--pp", "0", "--tg", "3", "-r", "1",
                 "--num-kv-blocks", "16"]) == 0
    table = capsys.readouterr().out
    assert "tg3" in table and "pp" not in table
    with pytest.raises(SystemExit):
        main(["bench", "single-stream", "--model", tiny_hf_folder, "--pp", "0", "--tg", "0"])


def test_measure_ponder_uses_distinct_prompts_and_leaves_the_pool_full(make_tiny_engine):
    engine = make_tiny_engine(enable_prefix_caching=False, max_num_seqs=1)
    results = single_stream.measure_ponder(engine, pp=12, tg=5, repetitions=3)
    assert [(r.test, len(r.samples_ts)) for r in results] == [("pp12", 3), ("tg5", 3)]
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # warm-up (12 + 2) + 3 pp prompts of 12 + 3 tg prompts of 1, generating 2 + 3 * 1 + 3 * 5
    assert stats["prompt_tokens"] == 12 + 3 * 12 + 3 and stats["prompt_tokens_cached"] == 0
    assert stats["generation_tokens"] == 2 + 3 + 15


def test_parse_captured_llama_bench_json():
    rows = json.load(open(SAMPLE))
    results = single_stream.parse_llama_bench(rows)
    assert [r.test for r in results] == [f"pp{rows[0]['n_prompt']}", f"tg{rows[1]['n_gen']}"]
    for result, row in zip(results, rows):
        assert result.name == "llama.cpp"
        assert (result.avg_ts, result.stddev_ts) == (row["avg_ts"], row["stddev_ts"])
        assert len(result.samples_ts) == 2 and all(v > 0 for v in result.samples_ts)
        assert result.avg_ts == pytest.approx(sum(result.samples_ts) / 2, rel=1e-4)
    info = single_stream.llama_bench_info(rows)
    assert info["n_threads"] == 2 and info["build_commit"] and "samples_ts" not in info


def test_table_has_mean_std_and_ratio_to_ponder():
    results = [StreamResult.from_samples("ponder", 512, 0, [100.0, 110.0, 90.0]),
               StreamResult.from_samples("ponder", 0, 128, [20.0, 20.0]),
               StreamResult("llama.cpp", 512, 0, [200.0, 200.0], 200.0, 0.0),
               StreamResult("llama.cpp", 0, 128, [50.0], 50.0, 0.0)]
    header, rule, pp, tg = single_stream.table(results).splitlines()
    assert header.split() == ["test", "ponder", "tok/s", "llama.cpp", "tok/s", "llama.cpp/ponder"]
    assert pp.split() == ["pp512", "100.00", "±", "10.00", "200.00", "±", "0.00", "2.00x"]
    assert tg.split() == ["tg128", "20.00", "±", "0.00", "50.00", "±", "0.00", "2.50x"]
    rows = single_stream.comparison(results)
    assert rows[0]["llama.cpp/ponder"] == pytest.approx(2.0)
    assert single_stream.label(512, 128) == "pp512+tg128"


def test_engine_info_takes_what_stats_has():
    info = single_stream.engine_info({"weights": "q4_0", "kernel": "avx512_vnni", "steps": 3})
    assert info == {"weights": "q4_0", "weight_bytes": None, "kernel": "avx512_vnni", "kv_cache_dtype": None}


def test_llama_bench_command_line(monkeypatch):
    monkeypatch.setenv("PONDER_LLAMA_BENCH", sys.executable)     # any executable: nothing is run
    argv = peers.llama_bench_argv("/models/m.gguf", 512, 128, 3)
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert argv[0] == sys.executable
    assert (flag("-m"), flag("-p"), flag("-n"), flag("-t"), flag("-r"), flag("-o")) == \
        ("/models/m.gguf", "512", "128", "2", "3", "json")
    with pytest.raises(ValueError):
        peers.llama_bench_argv(os.path.dirname(__file__), 1, 1, 1)


def _fake_binary(path) -> None:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


def test_build_script_needs_every_binary_and_its_stamp_before_skipping_the_build(tmp_path):
    """A copy of the script in a scratch root: it goes on to build (stopped at once by a failing PYTHON)
    with llama-server alone, or with both binaries but no stamp of its recipe (an older build); with
    both and the stamp it says "already built"."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "build_llama_server.sh"
    script.write_text(open(os.path.join(REPO_ROOT, "scripts", "build_llama_server.sh")).read())
    bin_dir = tmp_path / ".peers" / "bin"
    bin_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHON": "false", "TMPDIR": str(tmp_path)}
    run = lambda *a: subprocess.run(["bash", str(script), *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, timeout=60)
    (bin_dir / ".build-id").write_text(run("--build-id").stdout)
    _fake_binary(bin_dir / "llama-server")
    partial = run()
    assert partial.returncode != 0 and ">> downloading" in partial.stdout
    _fake_binary(bin_dir / "llama-bench")
    done = run()
    assert done.returncode == 0 and "already built" in done.stdout and "downloading" not in done.stdout
    (bin_dir / ".build-id").write_text("llama-cpp-python 0.0.1; flags: none\n")
    stale = run()
    assert stale.returncode != 0 and ">> downloading" in stale.stdout
