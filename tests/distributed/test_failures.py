"""A replica killed mid-stream (`ray.kill`): its requests end with an error within 2 s, the other
replica's complete, new requests go to the survivor, and a replacement joins. A client that goes
away mid-stream is aborted on its replica (every block freed there)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from ponder.config import EngineConfig
from tests.conftest import tiny_config, tiny_model, write_hf_folder
from tests.distributed.conftest import serve_front

LONG = 3000          # tokens: a few seconds of decoding on the tiny model


@pytest.fixture(scope="module")
def replicas(ray_cluster, tmp_path_factory, tiny_cache):
    from ponder.distributed.frontend import ReplicaSet
    from ponder.distributed.health import HealthPolicy
    from ponder.distributed.replica import ReplicaSpec

    cfg = tiny_config(max_position_embeddings=4096)
    folder = write_hf_folder(tiny_model(cfg), cfg, str(tmp_path_factory.mktemp("long")))
    config = EngineConfig(model=folder, cache_dir=tiny_cache, block_size=16, num_kv_blocks=1024)
    return ReplicaSet(ReplicaSpec(config), 2, health=HealthPolicy(interval=0.5))


@pytest.fixture(scope="module")
def server(replicas):
    yield from serve_front(replicas)


class Streamer(threading.Thread):
    """One streamed completion on its own thread: tokens seen, and how and when it ended."""

    def __init__(self, client, model: str, i: int):
        super().__init__(daemon=True)
        self.client, self.model, self.i = client, model, i
        self.chunks, self.finish, self.error, self.ended_at, self.request_id = 0, None, None, None, None

    def run(self) -> None:
        try:
            for chunk in self.client.completions.create(model=self.model, prompt=f"stream {self.i}", max_tokens=LONG,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                self.chunks += 1
                self.request_id = chunk.id           # the front end's key for the request
                for choice in chunk.choices:
                    self.finish = choice.finish_reason or self.finish
        except openai.APIError as e:
            self.error = str(e)
        self.ended_at = time.monotonic()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.02)


def test_a_killed_replica_fails_its_requests_at_once_and_is_replaced(server, client, replicas):
    import ray

    model = replicas.info.model_name
    streams = [Streamer(client, model, i) for i in range(4)]
    for s in streams:
        s.start()
    _wait(lambda: all(s.chunks >= 5 for s in streams), 30,
          lambda: f"every stream to be under way: {[(s.chunks, s.error) for s in streams]}")
    placed = {i: set(r.submissions) for i, r in replicas.replicas.items()}
    assert all(len(keys) == 2 for keys in placed.values()), placed        # two on each replica
    victim, survivor = 0, 1
    on_victim = [s for s in streams if s.request_id in placed[victim]]

    killed_at = time.monotonic()
    ray.kill(replicas.replicas[victim].actor)
    for s in on_victim:
        s.join(5)
        assert s.ended_at is not None and s.ended_at - killed_at < 2.0, s.ended_at and s.ended_at - killed_at
        assert s.error and "replica 0 failed" in s.error, s.error
    assert victim not in replicas.router.load                     # out of rotation

    answers = [client.completions.create(model=model, prompt=f"after {i}", max_tokens=4, temperature=0)
               for i in range(3)]                                 # new requests: the survivor serves them
    assert all(a.choices[0].finish_reason in ("length", "stop") for a in answers)

    for s in streams:
        s.join(60)
    survivors = [s for s in streams if s not in on_victim]
    assert len(survivors) == 2 and all(s.error is None and s.finish == "length" for s in survivors)

    _wait(lambda: any(r.replaces == victim and r.state == "serving" for r in replicas.replicas.values()), 60,
          "a replacement to join")
    health = httpx.get(server.url + "/health").json()
    assert [(r["status"], r["replaces"]) for r in health["replicas"]] == [("serving", None), ("serving", victim)]
    new = next(i for i, r in replicas.replicas.items() if r.replaces == victim)
    assert new in replicas.router.load and survivor in replicas.router.load
    two = [Streamer(client, model, 10 + i) for i in range(2)]    # two at once: one lands on the newcomer
    for s in two:
        s.start()
    _wait(lambda: all(s.chunks >= 1 for s in two), 30, "the two streams to start")
    assert replicas.replicas[new].submissions
    for s in two:
        s.join(60)
        assert s.error is None and s.finish == "length"


def test_a_client_that_goes_away_is_aborted_on_its_replica(server, replicas):
    body = {"model": replicas.info.model_name, "prompt": "going away", "max_tokens": LONG, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(10):
                next(lines)
    _wait(lambda: replicas.num_in_flight == 0, 5, "the request to be aborted")
    stats = replicas.collect_stats()
    assert all(s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] for s in stats.values()), stats
