"""`--ray-address`: a second driver joins a running loopback cluster by its address (the cluster
started here with `ray.init`'s loopback settings, as the module fixture does — not `ray start`),
places its replica there, serves, and on SIGTERM leaves the cluster as it found it."""

from __future__ import annotations

import signal
import time

import openai

from tests.distributed.processes import ServeProcess, descendants


def _cmdlines(pids: set[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                lines.append(f.read().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return lines


def test_a_second_driver_joins_by_address_and_leaves_the_cluster_as_it_was(ray_cluster, tmp_path, tiny_folder,
                                                                           tiny_cache):
    address = ray_cluster.gcs_address
    assert address.startswith("127.0.0.1:")
    total, free = ray_cluster.cpus()
    server = ServeProcess([tiny_folder, "--replicas", "1", "--ray-address", address, "--cache-dir", tiny_cache,
                           "--block-size", "16", "--num-kv-blocks", "128"], str(tmp_path / "serve.log"))
    try:
        health = server.wait_healthy()
        assert [r["status"] for r in health["replicas"]] == ["serving"]
        assert ray_cluster.cpus() == (total, free - 1)           # its replica runs in this cluster
        started = _cmdlines(descendants(server.proc.pid))
        assert not any("raylet" in c or "gcs_server" in c for c in started), started   # no cluster of its own
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        texts = [client.completions.create(model=tiny_folder, prompt=f"joined {i}", max_tokens=6, temperature=0)
                 .choices[0].text for i in range(3)]
        from ponder import LLM, SamplingParams

        alone = LLM(tiny_folder, cache_dir=tiny_cache, block_size=16, num_kv_blocks=128)
        assert texts == [alone.generate(f"joined {i}", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
                         for i in range(3)]                       # what one engine answers
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log()
    finally:
        server.kill()
    deadline = time.monotonic() + 10
    while ray_cluster.cpus() != (total, free) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_cluster.cpus() == (total, free)                   # its replica is gone, the cluster stays
    assert "Traceback" not in server.log(), server.log()
