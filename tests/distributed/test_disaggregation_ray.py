"""Prefill/decode disaggregation on a local Ray cluster (distributed/pd_frontend.py): one prefill
and one decode replica behind the HTTP front end give one engine's outputs (greedy, seeded, n > 1,
logprobs), their KV moving through the object store; a client that disconnects in the middle of a
hand-off (the fault hook pauses it there) leaves every block free on both replicas; a think request
is prefilled on the prefill replica and runs on the decode replica, whose prefix cache takes the
prompt's full blocks from the prefill's KV, and one aborted while its prompt moves frees both; health and metrics name each replica's role; a decode replica
killed mid-stream fails its requests at once and is replaced."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ponder import LLM, SamplingParams
from ponder.config import EngineConfig
from ponder.layers import quant_linear
from tests.conftest import tiny_config, tiny_model, write_hf_folder
from tests.distributed.conftest import serve_front
from tests.distributed.test_failures import Streamer, _wait
from tests.distributed.test_replicas import _without_ids
from tests.server.conftest import ServerThread

# the quantized path: a row's logprobs do not depend on the batch it is in, so they match exactly
pytestmark = pytest.mark.skipif(not quant_linear.available(), reason="needs a C compiler")

NUM_REQUESTS = 16
MAX_TOKENS = 12


def _prompt(i: int) -> str:
    return f"request {i}: a few words about the number {i * 7}"


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_cache) -> EngineConfig:
    """The tiny random-weight model, quantized, with a context long enough for a stream still
    running when its replica is killed."""
    cfg = tiny_config(max_position_embeddings=4096)
    folder = write_hf_folder(tiny_model(cfg), cfg, str(tmp_path_factory.mktemp("pd")))
    return EngineConfig(model=folder, cache_dir=tiny_cache, block_size=16, num_kv_blocks=1024, max_num_seqs=32,
                        weights="q8_0")


@pytest.fixture(scope="module")
def pd(ray_cluster, config):
    from ponder.distributed.health import HealthPolicy
    from ponder.distributed.pd_frontend import DisaggregatedReplicas
    from ponder.distributed.replica import ReplicaSpec

    return DisaggregatedReplicas(ReplicaSpec(config), 1, 1, health=HealthPolicy(interval=0.5))


@pytest.fixture(scope="module")
def server(pd):
    yield from serve_front(pd)


def _reports(pd) -> dict:
    return {role: report for (role, _), report in pd.kv_reports().items()}


def _all_free(pd) -> None:
    for role, report in _reports(pd).items():
        assert report["free_blocks"] == report["num_blocks"], (role, report)
        assert report["held"] == 0 and report["requests"] == 0, (role, report)


def _actor(pd, role: str):
    ((_, replica),) = [(i, r) for i, r in getattr(pd, role).replicas.items() if r.state == "serving"]
    return replica.actor


def test_16_streams_give_one_engines_greedy_outputs(server, client, pd, config):
    one = LLM(config.model, **{k: getattr(config, k) for k in ("block_size", "num_kv_blocks", "cache_dir", "weights")})
    reference = one.generate([_prompt(i) for i in range(NUM_REQUESTS)], SamplingParams(temperature=0,
                                                                                      max_tokens=MAX_TOKENS))
    expected = [(o.outputs[0].text, o.outputs[0].finish_reason) for o in reference]
    going_on = sum(len(o.outputs[0].token_ids) > 1 for o in reference)     # the others end at their first token
    before = _reports(pd)

    def stream(i: int) -> tuple[str, str | None]:
        text, finish = [], None
        for chunk in client.completions.create(model=pd.info.model_name, prompt=_prompt(i), max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True):
            for choice in chunk.choices:
                text.append(choice.text)
                finish = choice.finish_reason or finish
        return "".join(text), finish

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        got = list(pool.map(stream, range(NUM_REQUESTS)))
    assert got == expected
    after = _reports(pd)
    moved = after["decode"]["handoffs"] - before["decode"]["handoffs"]
    assert moved == after["prefill"]["handoffs"] - before["prefill"]["handoffs"] == going_on >= NUM_REQUESTS // 2
    assert after["decode"]["handoff_bytes"] > before["decode"]["handoff_bytes"]
    stats = {s.role: s.collect_stats() for s in pd.sets}
    assert all(s["prompt_tokens"] == 0 for s in stats["decode"].values())          # no recompute
    _all_free(pd)


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_n_logprobs_and_usage_are_one_engines(server, pd, config, stream):
    """n > 1, seeded sampling, logprobs, prompt logprobs and echo come out as one engine's."""
    from ponder.engine.engine import LLMEngine

    body = {"model": pd.info.model_name, "prompt": ["first prompt", "second"], "max_tokens": 6, "n": 2,
            "temperature": 0.9, "seed": 7, "logprobs": 2, "echo": True, "prompt_logprobs": 1, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    alone = ServerThread(LLMEngine(config))
    try:
        answers = [_without_ids(httpx.post(url + "/v1/completions", json=body, timeout=60))
                   for url in (alone.url, server.url)]
    finally:
        alone.stop()
    assert answers[0] == answers[1]
    _all_free(pd)


@pytest.mark.parametrize("role, stage", [("prefill", "held"), ("prefill", "exported"), ("decode", "arrived")])
def test_a_client_gone_mid_handoff_leaves_every_block_free(server, pd, role, stage):
    """The fault hook pauses the hand-off at `stage`; the client reads its first token and leaves
    meanwhile. The hand-off is dropped where it is, and both replicas end with every block free."""
    import ray

    actor = _actor(pd, role)
    ray.get(actor.set_handoff_delays.remote({stage: 1.5}), timeout=10)
    before = _reports(pd)
    body = {"model": pd.info.model_name, "prompt": f"going away at {stage}", "max_tokens": 200, "ignore_eos": True,
            "stream": True, "temperature": 0, "logprobs": 1}      # (logprobs: a first chunk even if its text is empty)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()            # (held: dropping it would close the stream)
                first = next(line for line in lines if line.startswith("data: {"))
                assert '"token_logprobs":[' in first       # the first token, from the prefill replica
                time.sleep(0.5)                             # the hand-off reaches the stage; leave in its pause
        _wait(lambda: pd.num_in_flight == 0, 10, "the request to be aborted")
    finally:
        ray.get(actor.set_handoff_delays.remote({}), timeout=10)
    after = _reports(pd)
    dropped = {side: after[side]["handoffs_dropped"] - before[side]["handoffs_dropped"] for side in after}
    # "exported": the front end drops the reference it gets; the object store frees the KV
    assert dropped == {"prefill": int(stage == "held"), "decode": int(stage == "arrived")}, dropped
    assert after["prefill"]["handoffs"] - before["prefill"]["handoffs"] == int(stage != "held")
    assert after["decode"]["handoffs"] == before["decode"]["handoffs"]      # it never reached the decode engine
    _all_free(pd)


THINK = {"messages": [{"role": "user", "content": "What is 2 + 2? Think it through, one step at a time."}],
         "max_tokens": 8, "ponder": {"strategy": "self-consistency", "n": 3, "temperature": 0.8, "seed": 3}}


def _think(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _added(before: dict, after: dict, key: str) -> dict:
    return {role: sum(after[role][i][key] - before[role][i].get(key, 0) for i in after[role]) for role in after}


def test_a_think_request_is_prefilled_on_a_prefill_replica_and_decoded_on_one_decode_replica(server, pd, config):
    """One engine's result. The prefill replica computed the prompt (all but its last token, as a
    think root does); the decode replica took the prompt's full blocks from its prefix cache, warmed
    with that KV, and computed only the rest (and each branch's last prompt token)."""
    from ponder.engine.engine import LLMEngine

    body = {"model": pd.info.model_name, **THINK}
    engine = LLMEngine(config)
    alone = ServerThread(engine)
    try:
        expected = _think(alone.url, body).json()
    finally:
        alone.stop()
    before = {s.role: s.collect_stats() for s in pd.sets}
    reply = _think(server.url, body)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    after = {s.role: s.collect_stats() for s in pd.sets}
    for key in ("answer", "final_answer", "candidates", "votes"):
        assert got["ponder"][key] == expected["ponder"][key], key
    assert got["choices"][0]["message"] == expected["choices"][0]["message"]
    assert _added(before, after, "requests_added") == {"prefill": 1, "decode": 1}
    computed, cached = (_added(before, after, key) for key in ("prompt_tokens", "prompt_tokens_cached"))
    root = got["ponder"]["num_prompt_tokens"] - 1                # the prompt but its last token
    full = root // pd.info.block_size * pd.info.block_size
    assert computed["prefill"] + cached["prefill"] == root and computed["prefill"] > 0
    assert cached["decode"] == full >= 2 * pd.info.block_size           # not recomputed
    assert computed["decode"] == engine.stats()["prompt_tokens"] - full == root - full + 3
    _all_free(pd)


@pytest.mark.parametrize("role, stage", [("prefill", "exported"), ("decode", "arrived")])
def test_a_think_request_aborted_while_its_prompt_moves_leaves_every_block_free(server, pd, role, stage):
    """Aborted while its prompt's KV waits in the object store (the prefill replica paused before
    telling the front end), or once fetched by the decode replica: the request ends aborted (503),
    nothing runs on, and every block is free on both replicas."""
    import ray

    actor = _actor(pd, role)
    ray.get(actor.set_handoff_delays.remote({stage: 1.5}), timeout=10)
    before = _reports(pd)
    try:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(_think, server.url, {"model": pd.info.model_name, **THINK})
            _wait(lambda: pd._warming, 10, "the think request to start")
            time.sleep(0.5)                                  # its prompt reaches the stage
            pd._loop.call_soon_threadsafe(pd.abort, list(pd._warming))
            response = reply.result(timeout=30)
        assert response.status_code == 503 and "aborted" in response.text, response.text
        _wait(lambda: pd.num_in_flight == 0, 10, "the request to be aborted")
    finally:
        ray.get(actor.set_handoff_delays.remote({}), timeout=10)
    after = _reports(pd)
    assert after["decode"]["handoffs_dropped"] - before["decode"]["handoffs_dropped"] == int(stage == "arrived")
    assert after["decode"]["handoffs"] == before["decode"]["handoffs"]       # no program started there
    assert after["prefill"]["handoffs"] - before["prefill"]["handoffs"] == 1
    _all_free(pd)


def test_a_think_request_whose_prefill_replica_dies_fails_clearly(server, pd):
    """Its prefill replica killed while the prompt's KV waits there: the request fails at once,
    naming it; the replica is replaced; nothing is left held on the decode replica."""
    import ray

    actor = _actor(pd, "prefill")
    (victim,) = pd.prefill.replicas
    ray.get(actor.set_handoff_delays.remote({"exported": 5}), timeout=10)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(_think, server.url, {"model": pd.info.model_name, **THINK})
        _wait(lambda: pd._warming, 10, "the think request to start")
        time.sleep(0.5)
        killed_at = time.monotonic()
        ray.kill(actor)
        response = reply.result(timeout=30)
    assert time.monotonic() - killed_at < 2.0
    assert response.status_code == 400 and "could not be prefilled" in response.text, response.text
    assert f"prefill replica {victim} failed" in response.text, response.text
    _wait(lambda: pd.num_in_flight == 0, 10, "the request to end")
    _wait(lambda: any(r.replaces == victim and r.state == "serving" for r in pd.prefill.replicas.values()), 30,
          "a replacement prefill replica")
    _all_free(pd)


def test_health_and_metrics_name_each_replicas_role(server, pd):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    assert sorted((r["role"], r["status"]) for r in health["replicas"]) == [("decode", "serving"),
                                                                           ("prefill", "serving")]
    text = httpx.get(server.url + "/metrics").text
    for s in pd.sets:
        for index in s.replicas:
            assert (f'ponder:prompt_tokens_total{{model_name="{pd.info.model_name}",replica="{index}",'
                    f'role="{s.role}"}}') in text, text
    # their hand-offs carry object references, which only Ray's channel may move
    from ponder.distributed.channel import RayLink
    assert all(isinstance(r.link, RayLink) for s in pd.sets for r in s.replicas.values() if r.state == "serving")


def test_a_killed_decode_replica_fails_its_requests_at_once_and_is_replaced(server, client, pd):
    import ray

    streams = [Streamer(client, pd.info.model_name, i) for i in range(2)]
    for s in streams:
        s.start()
    _wait(lambda: all(s.chunks >= 3 for s in streams), 30, lambda: [(s.chunks, s.error) for s in streams])
    (victim,) = pd.decode.replicas
    killed_at = time.monotonic()
    ray.kill(pd.decode.replicas[victim].actor)
    for s in streams:
        s.join(5)
        assert s.ended_at is not None and s.ended_at - killed_at < 2.0
        assert s.error and f"decode replica {victim} failed" in s.error, (s.error, s.finish, s.chunks)
    _wait(lambda: any(r.replaces == victim and r.state == "serving" for r in pd.decode.replicas.values()), 30,
          "a replacement decode replica")
    reply = client.completions.create(model=pd.info.model_name, prompt="after the kill", max_tokens=4,
                                      temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    _all_free(pd)
