"""Reports: side-by-side tables with ratios to ponder, the JSON document, plots; peers' pure helpers."""

import json
import os
import sys

import pytest

from ponder.bench import peers, report
from ponder.bench.metrics import RequestRecord, RunResult, compute_metrics
from ponder.bench.workloads import random_tokens


def run(name, concurrency=1, scale=1.0, mode="serve"):
    records = [RequestRecord(10, 4, 0.0, 1.0 * scale, [0.1 * scale, 0.4 * scale, 0.7 * scale, 1.0 * scale])
               for _ in range(3)]
    return RunResult(name, mode, concurrency, {"name": "random"}, records, 2.0 * scale,
                     compute_metrics(records, 2.0 * scale), engine_counters={"prefix_cache_hit_rate": 0.5})


def test_side_by_side_has_ratio_columns_to_ponder():
    text = report.side_by_side([run("ponder"), run("llama.cpp", scale=2.0)])
    header, rule, *rows = text.splitlines()
    assert header.split() == ["metric", "ponder", "llama.cpp", "llama.cpp/ponder"]
    by_metric = {r.split("  ")[0].strip(): r.split() for r in rows}
    assert by_metric["output tok/s"][-1] == "0.50x"       # half the throughput
    assert by_metric["TTFT mean ms"][-1] == "2.00x"       # twice the latency
    assert "prefix cache hit rate" in by_metric
    assert "/" not in report.side_by_side([run("a"), run("b")]).splitlines()[0]   # no ponder: no ratios


def test_tables_group_serve_runs_by_concurrency():
    text = report.tables([run("ponder", 1), run("ponder", 4), run("llama.cpp", 1), run("llama.cpp", 4)])
    assert "concurrency 1" in text and "concurrency 4" in text


def test_results_document_and_plots(tmp_path):
    runs = [run("ponder", 1), run("ponder", 4, scale=0.5), run("hf", 1, scale=3.0)]
    doc = report.results_document("serve", runs, goodput_slos={})
    for key in ("cpu_model", "cpu_cores", "torch_version", "git_commit", "python_version"):
        assert key in doc["machine"]
    assert doc["machine"]["cpu_cores"] == os.cpu_count()
    first = doc["runs"][0]
    assert first["request_rate"] is None               # inf is not JSON
    assert first["metrics"]["ttft_ms"]["p99"] == pytest.approx(100.0)
    assert first["requests"][0] == {"prompt_tokens": 10, "output_tokens": 4, "ttft_ms": 100.0,
                                    "tpot_ms": 300.0, "e2el_ms": 1000.0, "error": None}
    path = str(tmp_path / "out" / "r.json")
    report.write_json(path, doc)
    assert json.load(open(path))["command"] == "serve"
    pytest.importorskip("matplotlib")
    written = report.write_plots(runs, path)
    assert sorted(os.path.basename(p) for p in written) == ["r-latency-cdf.png", "r-throughput.png"]
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_llama_server_command_line(monkeypatch):
    monkeypatch.setenv("PONDER_LLAMA_SERVER", sys.executable)     # any executable: nothing is started
    w = random_tokens(3, 100, 200, 50, 1000)
    ctx = peers.slot_context(w)
    assert ctx % 256 == 0 and ctx >= w.max_prompt_len + 50
    server = peers.llama_server("/models/m.gguf", slots=16, slot_ctx=ctx)
    argv = server.argv
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert flag("-t") == "2" and flag("-np") == "16" and flag("-c") == str(16 * ctx) and flag("-cram") == "0"
    assert flag("--host") == "127.0.0.1" and server.base_url.endswith(flag("--port"))
    with pytest.raises(ValueError):
        peers.llama_server(os.path.dirname(__file__), 1, 256)


def test_ponder_server_command_line():
    server = peers.ponder_server("smollm2-135m-instruct", "--max-num-seqs 32")
    assert server.argv[1:4] == ["-m", "ponder.cli", "serve"]
    assert server.argv[-2:] == ["--max-num-seqs", "32"] and "--model" in server.argv


def test_left_padding_and_generated_length():
    torch = pytest.importorskip("torch")
    ids, mask = peers.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long
    assert peers.generated_length([4, 9, 2, 2], {2}) == 3
    assert peers.generated_length([4, 9, 1], {2}) == 3
