"""Fixtures for the replica tests: one local Ray cluster per test module, kept on loopback (see
../shared/RAY.md; ponder/distributed/cluster.py), and a tiny random-weight model as a Hugging Face
folder, so that replicas in other processes load the very weights the test's own engine has.

Nothing here imports ray at module level: the loopback settings must come before the first import.
"""

from __future__ import annotations

import os

import pytest

from ponder.config import EngineConfig
from tests.conftest import tiny_config, tiny_model, write_hf_folder
from tests.server.conftest import ServerThread

TINY_OPTIONS = dict(block_size=16, num_kv_blocks=256, max_num_seqs=32)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    cfg = tiny_config()
    return write_hf_folder(tiny_model(cfg), cfg, str(tmp_path_factory.mktemp("tiny_hf")))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="session")
def tiny_engine_config(tiny_folder, tiny_cache):
    """Make the EngineConfig of the tiny model: TINY_OPTIONS, overridden by keyword."""
    def make(**options) -> EngineConfig:
        return EngineConfig(model=tiny_folder, cache_dir=tiny_cache, **{**TINY_OPTIONS, **options})
    return make


@pytest.fixture(scope="module")
def client(server):
    """The openai SDK against the module's `server` fixture (a front end served on a real port)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on loopback for this module (4 logical CPUs, 256 MB object store),
    shut down and its folder wiped afterwards, whatever the tests did."""
    from ponder.distributed.cluster import RayCluster

    cluster = RayCluster(num_cpus=4)
    cluster.start()
    try:
        assert cluster.node_ip_address == "127.0.0.1"
        assert cluster.folder is not None and os.path.isdir(cluster.folder)
        yield cluster
    finally:
        folder = cluster.folder
        cluster.stop()
        assert not os.path.exists(folder)


def serve_front(front):
    """A module's `server` fixture body: the HTTP front end over `front` (a ReplicaSet or the P/D
    pair) on a real port; once stopped, every replica is stopped and no background task is left."""
    from ponder.distributed.serve import replica_app

    server = ServerThread(None, app=replica_app(front))
    yield server
    server.stop()
    assert all(r.state == "stopped" for s in getattr(front, "sets", (front,)) for r in s.replicas.values())
    assert all(t.done() for t in front._tasks)
