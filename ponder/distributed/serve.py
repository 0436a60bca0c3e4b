"""`ponder serve --replicas N`: N engine replicas on Ray behind the same HTTP front end; or
`--prefill-replicas P --decode-replicas D`: prefill/decode disaggregation (pd_frontend.py).

On one machine a local Ray cluster is started with the loopback settings; `--ray-address` joins a
cluster the user started instead. The replicas load their models before the server listens; more
replicas than the cluster's free CPUs allow is an error at once. On SIGTERM every replica drains (up
to `drain_timeout`), the replicas end, and Ray is shut down — a local cluster's processes with it.
"""

from __future__ import annotations

import time

from fastapi import FastAPI

from ponder.config import EngineConfig
from ponder.distributed.cluster import RayCluster
from ponder.engine.structured import Grammars
from ponder.server.app import ServerConfig, ServerState, serving_app
from ponder.server.launch import run_server
from ponder.server.protocol import EngineLimits
from ponder.server.responses import TokenTexts


def replica_app(replicas, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app over a ReplicaSet (distributed/frontend.py) or DisaggregatedReplicas
    (pd_frontend.py), started with the app's lifespan."""
    from ponder.distributed.metrics import ReplicaMetrics

    config = config or ServerConfig()
    info = replicas.info
    model_name = config.served_model_name or info.model_name
    tokenizer = info.tokenizer
    limits = EngineLimits(info.max_model_len, info.vocab_size, info.max_num_seqs, info.sampling_defaults)
    # the front end compiles output constraints only to check them (400s); the replicas use their own
    grammars = Grammars(tokenizer.to_json, info.vocab_size, info.eos_token_ids, engine_threads=1)
    return serving_app(ServerState(config, replicas, ReplicaMetrics(model_name, replicas), model_name, limits,
                                   tokenizer, TokenTexts(tokenizer), int(time.time()), grammars))


def serve_replicas(model: str | None, engine_options: dict, config: ServerConfig, num_replicas: int = 0,
                   ray_address: str | None = None, policy: str = "prefix-aware", replica_cpus: int = 1,
                   num_prefill: int = 0, num_decode: int = 0, object_store_mb: int | None = None,
                   channel: str = "socket") -> None:
    """Start (or join) Ray, start the replicas — `num_replicas` of them, or `num_prefill` prefill
    and `num_decode` decode replicas — serve until a shutdown signal, and clean up."""
    engine_config = EngineConfig.from_options(model, **engine_options)   # bad options: an error before Ray
    store = {} if object_store_mb is None else {"object_store_memory": object_store_mb << 20}
    with RayCluster(address=ray_address, **store):
        from ponder.distributed.frontend import ReplicaSet      # imports ray: after the loopback settings
        from ponder.distributed.replica import ReplicaSpec

        spec = ReplicaSpec(engine_config, config.max_waiting_requests, replica_cpus, channel=channel)
        if num_prefill or num_decode:
            from ponder.distributed.pd_frontend import DisaggregatedReplicas

            replicas = DisaggregatedReplicas(spec, num_prefill, num_decode, policy)
        else:
            replicas = ReplicaSet(spec, num_replicas, policy)
        run_server(replica_app(replicas, config), config, lambda: replicas.request_drain(config.drain_timeout))
