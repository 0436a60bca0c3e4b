"""Two engine replicas on a local Ray cluster behind the HTTP front end: the same greedy outputs as
one engine, prefix-aware routing saves prompt computation, think requests, metrics and health,
503 when every replica is full, and too many replicas for the CPUs is an error at once."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ponder import LLM, SamplingParams
from ponder.config import EngineConfig
from ponder.server.app import ServerConfig
from tests.conftest import tiny_config, tiny_model, write_hf_folder
from tests.distributed.conftest import serve_front
from tests.server.conftest import ServerThread

NUM_REQUESTS = 20
MAX_TOKENS = 12


def _prompt(i: int) -> str:
    return f"request {i}: a few words about the number {i * 7}"


@pytest.fixture(scope="module")
def replicas(ray_cluster, tiny_engine_config):
    from ponder.distributed.frontend import ReplicaSet
    from ponder.distributed.replica import ReplicaSpec

    return ReplicaSet(ReplicaSpec(tiny_engine_config()), 2)


@pytest.fixture(scope="module")
def server(replicas):
    yield from serve_front(replicas)


@pytest.fixture(scope="module")
def one_engine(tiny_engine_config):
    config = tiny_engine_config()
    return LLM(config.model, **{k: getattr(config, k) for k in ("block_size", "num_kv_blocks", "max_num_seqs",
                                                                "cache_dir")})


def _prompt_tokens(replicas) -> int:
    return sum(s["prompt_tokens"] for s in replicas.collect_stats().values())


def test_20_streams_give_one_engines_greedy_outputs(server, client, replicas, one_engine):
    expected = [(o.outputs[0].text, o.outputs[0].finish_reason) for o in one_engine.generate(
        [_prompt(i) for i in range(NUM_REQUESTS)], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))]

    def stream(i: int) -> tuple[str, str | None]:
        text, finish = [], None
        for chunk in client.completions.create(model=replicas.info.model_name, prompt=_prompt(i),
                                               max_tokens=MAX_TOKENS, temperature=0, stream=True):
            for choice in chunk.choices:
                text.append(choice.text)
                finish = choice.finish_reason or finish
        return "".join(text), finish

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        got = list(pool.map(stream, range(NUM_REQUESTS)))
    assert got == expected
    added = [s["requests_added"] for s in replicas.collect_stats().values()]
    assert sum(added) == NUM_REQUESTS and min(added) > 0, added      # both replicas served


@pytest.mark.parametrize("stream", [False, True])
def test_choices_logprobs_and_usage_are_one_engines(server, replicas, tiny_engine_config, stream):
    """n > 1, logprobs, prompt logprobs and echo travel as deltas and come out as one engine's."""
    from ponder.engine.engine import LLMEngine

    body = {"model": replicas.info.model_name, "prompt": ["first prompt", "second"], "max_tokens": 6, "n": 2,
            "temperature": 0.9, "seed": 7, "logprobs": 2, "echo": True, "prompt_logprobs": 1, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    alone = ServerThread(LLMEngine(tiny_engine_config()))
    try:
        answers = [_without_ids(httpx.post(url + "/v1/completions", json=body, timeout=60))
                   for url in (alone.url, server.url)]
    finally:
        alone.stop()
    assert answers[0] == answers[1]


def _without_ids(response: httpx.Response) -> dict:
    """A completion's choices and usage; a stream's chunks joined per choice (how a stream is cut
    into chunks depends on when its reader reads)."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        body = response.json()
        return {"choices": body["choices"], "usage": body["usage"]}
    choices, usage = {}, None
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            joined = choices.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": {}})
            joined["text"] += c["text"]
            joined["finish_reason"] = c["finish_reason"] or joined["finish_reason"]
            for key, values in (c.get("logprobs") or {}).items():
                joined["logprobs"].setdefault(key, []).extend(values)
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _shared_prefix_requests(seed: int) -> list[list[int]]:
    """4 system prompts of 16 blocks (16 tokens each) x 16 requests, each with its own short tail,
    shuffled."""
    rng = random.Random(seed)
    systems = [[rng.randrange(256) for _ in range(16 * 16)] for _ in range(4)]
    requests = [system + [rng.randrange(256) for _ in range(4)] for system in systems for _ in range(16)]
    rng.shuffle(requests)
    return requests


def _computed_prompt_tokens(client, replicas, requests: list[list[int]]) -> int:
    before = _prompt_tokens(replicas)

    def send(ids: list[int]) -> None:
        client.completions.create(model=replicas.info.model_name, prompt=ids, max_tokens=1, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, requests))
    return _prompt_tokens(replicas) - before


def test_prefix_aware_routing_computes_shared_prompts_once_and_round_robin_does_not(client, replicas,
                                                                                   tiny_engine_config):
    one = LLM(tiny_engine_config().model, **{k: getattr(tiny_engine_config(), k)
                                             for k in ("block_size", "num_kv_blocks", "cache_dir")})
    results = {}
    for seed, policy in enumerate(("prefix-aware", "round-robin")):
        requests = _shared_prefix_requests(seed)     # prompts no replica has cached yet
        engine_before = one.engine.stats()["prompt_tokens"]
        one.generate(requests, SamplingParams(temperature=0, max_tokens=1))
        alone = one.engine.stats()["prompt_tokens"] - engine_before
        replicas.set_policy(policy)
        results[policy] = _computed_prompt_tokens(client, replicas, requests) / alone
    replicas.set_policy("prefix-aware")
    assert results["prefix-aware"] <= 1.2, results
    assert results["round-robin"] >= 1.5, results


def test_a_think_request_runs_on_one_replica(client, replicas):
    before = replicas.collect_stats()
    reply = client.chat.completions.create(
        model=replicas.info.model_name, messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=8, extra_body={"ponder": {"strategy": "self-consistency", "n": 3, "temperature": 0.8}})
    assert reply.choices[0].finish_reason == "stop"
    details = reply.model_extra["ponder"]
    assert details["strategy"] == "self-consistency" and len(details["candidates"]) == 3
    after = replicas.collect_stats()
    added = {i: after[i]["requests_added"] - before[i]["requests_added"] for i in after}
    assert sorted(added.values()) == [0, 1], added      # the whole program (3 branches) on one replica


def test_metrics_are_labelled_by_replica_and_health_reports_each(server, replicas):
    text = httpx.get(server.url + "/metrics").text
    for index in replicas.replicas:
        assert f'ponder:prompt_tokens_total{{model_name="{replicas.info.model_name}",replica="{index}"}}' in text
        assert f'replica="{index}"' in text.split("ponder:time_to_first_token_seconds_bucket", 1)[1]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    assert [(r["replica"], r["status"]) for r in health["replicas"]] == [(i, "serving") for i in replicas.replicas]


def test_the_data_plane_is_a_loopback_socket_that_only_the_token_opens(server, replicas):
    import asyncio

    from ponder.distributed.channel import SocketLink, read_frame, write_raw

    serving = [r for r in replicas.replicas.values() if r.state == "serving"]
    assert serving and all(isinstance(r.link, SocketLink) for r in serving)
    assert all(r.info.channel_address[0] == "127.0.0.1" for r in serving)

    async def knock(address) -> None:           # a stranger's connection: closed without an answer
        reader, writer = await asyncio.open_connection(*address)
        write_raw(writer, b"a guessed token!")
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await asyncio.wait_for(read_frame(reader), 5)
        writer.close()

    for r in serving:
        asyncio.run(knock(r.info.channel_address))


def test_too_many_replicas_for_the_cpus_is_an_error_at_once(ray_cluster, tiny_engine_config):
    from ponder.distributed.cluster import ClusterError
    from ponder.distributed.frontend import ReplicaSet
    from ponder.distributed.replica import ReplicaSpec

    total, free = ray_cluster.cpus()
    start = time.monotonic()
    with pytest.raises(ClusterError, match=f"need {int(free) + 1} CPUs, but the Ray cluster has {free:g} free"):
        ReplicaSet(ReplicaSpec(tiny_engine_config()), int(free) + 1)
    assert time.monotonic() - start < 2
    assert ray_cluster.cpus() == (total, free)       # nothing was started


def test_every_replica_full_is_503_with_retry_after(ray_cluster, tmp_path, tiny_cache):
    """Replicas of one sequence and no waiting room: two long requests fill both, the third is
    refused by each in turn and gets 503 with Retry-After."""
    from ponder.distributed.frontend import ReplicaSet
    from ponder.distributed.replica import ReplicaSpec
    from ponder.distributed.serve import replica_app

    cfg = tiny_config(max_position_embeddings=4096)      # requests long enough to still run when checked
    folder = write_hf_folder(tiny_model(cfg), cfg, str(tmp_path / "long"))
    config = EngineConfig(model=folder, cache_dir=tiny_cache, block_size=16, num_kv_blocks=260, max_num_seqs=1)
    front = ReplicaSet(ReplicaSpec(config, max_waiting_requests=0), 2)
    server = ServerThread(None, app=replica_app(front, ServerConfig(max_waiting_requests=0)))
    try:
        body = {"model": front.info.model_name, "prompt": "go on and on", "max_tokens": 4000,
                "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as first, \
                    http.stream("POST", "/v1/completions", json=body) as second:
                assert first.status_code == second.status_code == 200
                lines = [first.iter_lines(), second.iter_lines()]    # (held: dropping one closes its stream)
                for read in lines:
                    next(read)                           # both are running
                refused = http.post("/v1/completions", json={**body, "stream": False})
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"] == "1"
                assert "every replica is full" in refused.json()["error"]["message"]
            metrics = http.get("/metrics").text
            assert 'ponder:request_rejected_total{model_name="%s",reason="overloaded"} 1.0' % front.info.model_name \
                in metrics
    finally:
        server.stop()


def test_workers_get_the_cache_folder_from_before_home_moved_and_this_ponder(ray_cluster):
    """The loopback settings move HOME; the cache folder resolved before is what workers use (so
    replicas rebuild no kernel), and they import the ponder this test runs."""
    import os

    import ray

    import ponder

    @ray.remote(num_cpus=0)
    def where() -> tuple[str, str, str]:
        import ponder as theirs

        return os.environ.get("PONDER_CACHE_DIR", ""), os.environ["HOME"], theirs.__file__

    cache, home, module = ray.get(where.remote(), timeout=30)
    assert home.startswith(ray_cluster.folder)                     # the bootstrap HOME
    assert not cache.startswith(ray_cluster.folder) and cache == os.environ["PONDER_CACHE_DIR"]
    assert module == ponder.__file__


def test_a_replica_that_cannot_load_its_model_is_a_clear_error_at_start(ray_cluster, tiny_cache):
    from ponder.distributed.cluster import ClusterError
    from ponder.distributed.frontend import ReplicaSet
    from ponder.distributed.replica import ReplicaSpec

    total, free = ray_cluster.cpus()
    with pytest.raises(ClusterError, match="the replicas did not start: .*unknown model '/no/such/model'"):
        ReplicaSet(ReplicaSpec(EngineConfig(model="/no/such/model", cache_dir=tiny_cache)), 1, ready_timeout=60)
    deadline = time.monotonic() + 10
    while ray_cluster.cpus() != (total, free) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_cluster.cpus() == (total, free)
