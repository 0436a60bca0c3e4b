"""`ponder serve --replicas 2` as a process: it starts its own loopback Ray cluster, serves, and on
SIGTERM lets the replicas drain (a stream in flight completes), exits 0, and leaves no Ray process
and no Ray folder behind. Too many replicas for the CPUs is a clear error at start."""

from __future__ import annotations

import glob
import os
import signal
import tempfile

import httpx
import openai

from tests.distributed.processes import ServeProcess, alive, descendants


def _ray_folders() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ponder-ray-*")))


def test_serve_replicas_drains_on_sigterm_and_leaves_no_ray_process(tmp_path, tiny_folder, tiny_cache):
    folders_before = _ray_folders()
    server = ServeProcess([tiny_folder, "--replicas", "2", "--cache-dir", tiny_cache, "--block-size", "16",
                           "--num-kv-blocks", "256", "--drain-timeout", "20"], str(tmp_path / "serve.log"))
    try:
        health = server.wait_healthy()
        assert [r["status"] for r in health["replicas"]] == ["serving", "serving"]
        ray_processes = descendants(server.proc.pid)
        assert len(ray_processes) >= 4, ray_processes       # the GCS, the raylet, two replicas at least
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.completions.create(model=tiny_folder, prompt="hello", max_tokens=5, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")

        body = {"model": tiny_folder, "prompt": "drain me", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-2], rest[-2]     # drained: it finished, not aborted
        assert server.proc.wait(timeout=60) == 0, server.log()
        assert not alive(ray_processes), alive(ray_processes)
    finally:
        server.kill()
    assert _ray_folders() <= folders_before
    assert "Traceback" not in server.log(), server.log()


def test_more_replicas_than_cpus_is_an_error_at_start(tmp_path, tiny_folder, tiny_cache):
    server = ServeProcess([tiny_folder, "--replicas", str(os.cpu_count() + 1), "--cache-dir", tiny_cache],
                          str(tmp_path / "serve.log"))
    try:
        assert server.proc.wait(timeout=60) == 2
    finally:
        server.kill()
    log = server.log()
    assert f"ponder: error: {os.cpu_count() + 1} replicas of 1 CPU(s) each need" in log, log
    assert "Traceback" not in log, log
