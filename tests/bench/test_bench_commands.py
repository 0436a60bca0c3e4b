"""Short real runs of every `ponder bench` command on the packaged default model, checking the JSON.

Sizes are tiny (a few requests of a few tokens): these check that the commands work end to end and
write what they promise, not the numbers. The llama.cpp runs need `make peers` and skip without it.
"""

import json
import math
import os

import pytest

from ponder.bench import peers
from ponder.cli import main

pytestmark = pytest.mark.slow

SMALL = ["--num-requests", "4", "--input-len", "8:16", "--output-len", "8", "--no-progress"]
KV = ["--num-kv-blocks", "64"]


def _have(program: str) -> bool:
    try:
        peers.llama_binary(program)
        return True
    except FileNotFoundError:
        return False


needs_llama = pytest.mark.skipif(not _have("llama-server"), reason="llama-server not built (make peers)")
needs_llama_bench = pytest.mark.skipif(not _have("llama-bench"), reason="llama-bench not built (make peers)")


def _bench(tmp_path, *argv) -> dict:
    out = str(tmp_path / "results.json")
    assert main(["bench", *argv, "--output", out]) == 0
    with open(out) as f:
        return json.load(f)


def _check_run(run: dict, name: str, requests: int, output_len: int) -> None:
    m = run["metrics"]
    assert run["name"] == name
    assert (m["completed"], m["failed"]) == (requests, 0)
    assert m["output_tokens"] == requests * output_len
    assert m["prompt_tokens"] == run["workload"]["prompt_tokens"]
    assert m["output_throughput"] > 0 and m["total_throughput"] > m["output_throughput"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        summary = m[key]
        assert 0 < summary["p50"] <= summary["p99"], key
    assert len(run["requests"]) == requests
    assert all(r["output_tokens"] == output_len and r["error"] is None for r in run["requests"])


def _check_machine(doc: dict) -> None:
    machine = doc["machine"]
    assert machine["cpu_cores"] >= 1 and machine["torch_version"]
    assert "cpu_model" in machine and "git_commit" in machine


def test_throughput_with_hf_peer(tmp_path):
    doc = _bench(tmp_path, "throughput", "--workload", "random", *SMALL, *KV, "--peer", "hf",
                 "--goodput", "e2el:600000")
    _check_machine(doc)
    assert doc["command"] == "throughput" and doc["goodput_slos"] == {"e2el": 600000.0}
    ponder, hf = doc["runs"]
    _check_run(ponder, "ponder", 4, 8)
    _check_run(hf, "hf", 4, 8)
    assert ponder["mode"] == hf["mode"] == "offline"
    assert ponder["metrics"]["goodput"] > 0 and ponder["metrics"]["good_requests"] == 4
    counters = ponder["engine_counters"]
    assert counters["prompt_tokens"] + counters["prompt_tokens_cached"] == ponder["metrics"]["prompt_tokens"]
    assert counters["generation_tokens"] == 32 and counters["preemptions"] == 0
    assert os.path.exists(tmp_path / "results-latency-cdf.png")


def test_throughput_shared_prefix_hits_the_prefix_cache(tmp_path):
    doc = _bench(tmp_path, "throughput", "--workload", "shared-prefix", "--num-groups", "2", "--prefix-len", "48",
                 *SMALL, *KV, "--no-plots", "--max-num-seqs", "1")
    (run,) = doc["runs"]
    _check_run(run, "ponder", 4, 8)
    assert run["engine_counters"]["prefix_cache_hit_rate"] > 0.3


@needs_llama
def test_throughput_with_llamacpp_peer(tmp_path):
    doc = _bench(tmp_path, "throughput", "--workload", "random", *SMALL, *KV, "--peer", "llama.cpp", "--no-plots")
    ponder, llama = doc["runs"]
    _check_run(llama, "llama.cpp", 4, 8)
    assert llama["config"]["parallel"] == 4 and llama["config"]["cache_ram"] == 0
    assert llama["engine_counters"]["generation_tokens"] >= 32


def test_serve_against_a_started_ponder_server(tmp_path):
    doc = _bench(tmp_path, "serve", "--peer", "ponder", "--concurrency", "1,2", *SMALL,
                 "--ponder-args", "--num-kv-blocks 64", "--goodput", "ttft:600000", "tpot:600000")
    _check_machine(doc)
    runs = doc["runs"]
    assert [(r["name"], r["concurrency"], r["mode"]) for r in runs] == [("ponder", 1, "serve"), ("ponder", 2, "serve")]
    for run in runs:
        _check_run(run, "ponder", 4, 8)
        assert run["metrics"]["good_requests"] == 4
        assert run["config"]["base_url"].startswith("http://127.0.0.1:")
        counters = run["engine_counters"]          # scraped from the server's /metrics
        assert counters["preemptions"] == 0 and "prefix_cache_hit_rate" in counters
        assert counters["generation_tokens"] == 32
    assert os.path.exists(tmp_path / "results-throughput.png")


@needs_llama
def test_serve_against_llamacpp(tmp_path):
    doc = _bench(tmp_path, "serve", "--peer", "llama.cpp", "--concurrency", "2", *SMALL, "--no-plots")
    (run,) = doc["runs"]
    _check_run(run, "llama.cpp", 4, 8)
    assert run["engine_counters"]["generation_tokens"] >= 32


@needs_llama_bench
def test_single_stream_against_llama_bench(tmp_path):
    doc = _bench(tmp_path, "single-stream", "--pp", "16", "--tg", "4", "-r", "2", "--peer", "llama.cpp")
    _check_machine(doc)
    assert [(r["name"], r["test"]) for r in doc["runs"]] == \
        [("ponder", "pp16"), ("ponder", "tg4"), ("llama.cpp", "pp16"), ("llama.cpp", "tg4")]
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 for r in doc["runs"])
    llama = doc["llama.cpp"]
    assert llama["n_threads"] == 2 and llama["argv"][-2:] == ["-o", "json"]
    assert all(row["llama.cpp/ponder"] > 0 for row in doc["comparison"])


def test_roofline_rates_a_results_file(tmp_path):
    results = tmp_path / "in.json"
    results.write_text(json.dumps({"runs": [{"name": "ponder", "mode": "offline", "concurrency": 4,
                                             "metrics": {"output_throughput": 50.0, "total_throughput": 150.0}}]}))
    doc = _bench(tmp_path, "roofline", "--bandwidth-mb", "16", "--matmul-size", "128", "--results", str(results))
    _check_machine(doc)
    assert doc["peaks"]["bandwidth_gbs"] > 0 and doc["peaks"]["matmul_gflops"] > 0
    assert doc["cost"]["params"] == pytest.approx(134.5e6, rel=0.01)      # SmolLM2-135M
    roof = doc["roofline"]
    assert roof["bandwidth_tok_s"] > 0 and roof["compute_tok_s"] > 0
    (row,) = doc["runs"]
    assert row["pct_of_attainable"] == pytest.approx(100 * 50.0 / row["attainable_tok_s"])
    assert row["pct_of_compute"] == pytest.approx(100 * 150.0 / roof["compute_tok_s"])


def test_tune_reports_the_best_setting(tmp_path):
    doc = _bench(tmp_path, "tune", "--workload", "random", *SMALL, *KV, "--batched-tokens-grid", "16,64",
                 "--num-seqs-grid", "2")
    assert len(doc["runs"]) == 2
    best = max(doc["runs"], key=lambda r: r["metrics"]["output_throughput"])
    assert doc["best"]["max_num_batched_tokens"] == best["config"]["max_num_batched_tokens"]
    assert {r["config"]["max_num_batched_tokens"] for r in doc["runs"]} == {16, 64}
    assert all(r["config"]["max_num_seqs"] == 2 for r in doc["runs"])


def test_costmodel_fits_coefficients(tmp_path):
    doc = _bench(tmp_path, "costmodel", "--input-lens", "8,32", "--output-lens", "2,6", "--num-requests", "2",
                 *KV, "--no-progress")
    assert len(doc["runs"]) == 4
    assert {(r["workload"]["prompt_len_max"], r["workload"]["output_len"]) for r in doc["runs"]} == \
        {(8, 2), (8, 6), (32, 2), (32, 6)}
    model = doc["cost_model"]
    assert set(model) == {"a", "b", "c", "r2"}
    # Well-formed, not signed: on a loaded 2-core machine a fitted coefficient can come out
    # negative from timing noise alone.
    assert all(math.isfinite(model[k]) for k in ("a", "b", "c")) and model["r2"] <= 1.0


def test_costmodel_per_step_fits_non_negative_coefficients(tmp_path):
    doc = _bench(tmp_path, "costmodel", "--per-step", "--sweep", "small", "--note", "test", *KV, "--no-progress")
    model, steps = doc["step_cost_model"], doc["steps"]
    assert doc["mode"] == "per-step" and doc["note"] == "test" and model["steps"] == len(steps["rows"]) > 0
    assert all(model[k] >= 0 for k in "abcde") and model["r2"] <= 1.0
    assert steps["columns"] == ["point", "prompt_tokens", "decode_rows", "context_tokens", "prefill_context_tokens",
                                "seconds"]
    assert len({row[0] for row in steps["rows"]}) == len(doc["sweep"]) == 4     # every sweep point timed
