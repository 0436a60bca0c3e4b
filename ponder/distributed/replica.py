"""An engine replica: one LLMEngine, driven by the AsyncEngine on its own engine thread, served to a
front end (distributed/frontend.py) as the methods of a Ray actor.

The class is plain Python — the front end makes it an actor (`ray.remote(...).options(num_cpus=...)`)
— so another kind of replica (prefill-only, or decoding from a KV hand-off: distributed/pd_replica.py)
is a subclass that adds its methods, and the front end spawns whichever class it is given.

Requests go in by calls (`add`, `start_program`, `abort`), which answer once the engine has taken
the request or refused it. Everything that comes out of the engine travels on one channel per
replica: a batch at a time, what changed for every request since the last one (output deltas,
wire.py; a program's events and result; an error) — so a step of 64 sequences costs one message,
not 64. Calls and batches go over the replica's data-plane socket (channel.py) when the front end
asks for one at `ready`, else over Ray (actor calls, and `updates()`, a streaming generator).
When the replica dies the channel breaks, and the front end fails the replica's requests at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from ponder.config import EngineConfig
from ponder.engine.async_engine import AsyncEngine
from ponder.engine.engine import LLMEngine
from ponder.engine.engine_thread import EngineThread
from ponder.engine.programs import ProgramFactory
from ponder.engine.streams import ProgramUpdate, Stream
from ponder.model.loader import DEFAULT_MODEL
from ponder.model.tokenizer import Tokenizer
from ponder.sampling_params import SamplingParams
from ponder.server.metrics import ServerMetrics
from ponder.distributed.wire import HandoffReady, OutputDelta, OutputEncoder, WireError

logger = logging.getLogger("ponder.distributed")

# one entry of a batch: (submission id, what changed, whether the submission has ended)
Payload = list[OutputDelta] | ProgramUpdate | HandoffReady | WireError
Entry = tuple[str, Payload, bool]


@dataclass
class ReplicaSpec:
    """How to build a replica (picklable: it is sent to the actor)."""

    engine_config: EngineConfig
    max_waiting_requests: int | None = 256     # past it the replica refuses (the front end tries another)
    num_cpus: int = 1                          # the actor's CPUs; the engine's threads unless set
    channel: str = "socket"                    # the data plane: "socket" (channel.py) or "ray"
    # a test hook of the P/D replicas (pd_replica.py): seconds to pause at a hand-off stage
    handoff_delays: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.channel not in ("socket", "ray"):
            raise ValueError(f"the replicas' channel must be 'socket' or 'ray', got {self.channel!r}")

    def config(self) -> EngineConfig:
        if self.engine_config.num_threads is None:
            return replace(self.engine_config, num_threads=self.num_cpus)
        return self.engine_config


@dataclass
class ReplicaInfo:
    """What a started replica tells the front end: enough to check and route requests."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    block_size: int
    num_kv_blocks: int
    sampling_defaults: dict
    eos_token_ids: list[int]
    tokenizer: Tokenizer
    channel_address: tuple[str, int] | None = None   # its ChannelServer (channel.py); None: over Ray
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


class Outbox:
    """What the replica has to send, in order, until the channel takes it."""

    def __init__(self):
        self._entries: list[Entry] = []
        self._ready = asyncio.Event()

    def post(self, key: str, payload: Payload, ended: bool) -> None:
        self._entries.append((key, payload, ended))
        self._ready.set()

    async def take(self) -> list[Entry]:
        await self._ready.wait()
        self._ready.clear()
        entries, self._entries = self._entries, []
        return entries


class EngineReplica:
    """One engine behind the AsyncEngine, as an actor's methods (all on the actor's event loop)."""

    SOCKET_CHANNEL = True                   # its data plane may be a socket (channel.py), not Ray
    CHANNEL_METHODS = frozenset({"add", "start_program", "abort"})   # what the socket may call

    def __init__(self, spec: ReplicaSpec, replica_id: int):
        self.replica_id = replica_id
        self._engine_thread = EngineThread(f"ponder-replica-{replica_id}")
        config = spec.config()
        engine = self._engine_thread.call(lambda: LLMEngine(config))   # the loop's own thread builds it
        self.model_name = config.model or DEFAULT_MODEL
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine.stats)
        self.engine = AsyncEngine(engine, spec.max_waiting_requests, on_step=self.metrics.observe_step,
                                  engine_thread=self._engine_thread)
        self._outbox = Outbox()
        self._encoder = OutputEncoder()
        self._followers: dict[str, asyncio.Task] = {}
        self._started = False
        self._channel = None

    async def ready(self, channel_token: bytes | None = None) -> ReplicaInfo:
        """Start the engine loop (once) and describe the replica; with `channel_token`, also open
        the data-plane socket (channel.py) that a front end holding the token connects to."""
        if not self._started:
            self.engine.start()
            self._started = True
        address = None
        if channel_token is not None and self.SOCKET_CHANNEL:
            if self._channel is None:
                import ray

                from ponder.distributed.channel import ChannelServer

                self._channel = ChannelServer(self, self.CHANNEL_METHODS, self._outbox.take, channel_token)
                self._channel_address = await self._channel.start(ray.util.get_node_ip_address())
            address = self._channel_address
        engine = self.engine.engine
        return ReplicaInfo(self.model_name, engine.max_model_len, engine.vocab_size, engine.config.max_num_seqs,
                           engine.pool.block_size, engine.pool.num_blocks, dict(engine.sampling_defaults),
                           list(engine.eos_token_ids), engine.tokenizer, address)

    # -- requests -------------------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: SamplingParams, request_id: str) -> WireError | None:
        """Queue the requests (AsyncEngine.add); None once taken, else why not (nothing is queued)."""
        return await self._take(request_id, self.engine.add(prompts, params, request_id))

    async def start_program(self, factory: ProgramFactory, request_id: str) -> WireError | None:
        """Start the program the description `factory` builds (ponder.think.run.ThinkProgram)."""
        return await self._take(request_id, self.engine.start_program(factory, request_id))

    async def _take(self, key: str, submitting) -> WireError | None:
        """Await the AsyncEngine's `submitting` (an add or a start) and follow its stream under `key`."""
        try:
            stream = await submitting
        except Exception as e:         # refused (EngineUnavailable, ValueError, ...): the front end answers
            return WireError.of(e)
        self._follow(key, stream)
        return None

    async def abort(self, request_ids: list[str], reason: str = "aborted by the client") -> None:
        self.engine.abort(request_ids, reason)

    # -- the channel ----------------------------------------------------------------------------
    async def updates(self) -> AsyncIterator[list[Entry]]:
        """The replica's one output channel over Ray (a streaming generator; one reader; unused
        when the socket carries the batches): a batch of entries each time some request
        progressed, ended or failed."""
        while True:
            yield await self._outbox.take()

    def _follow(self, key: str, stream: Stream) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(key, stream))
        self._followers[key] = task
        task.add_done_callback(lambda _: self._followers.pop(key, None))

    async def _forward(self, key: str, stream: Stream) -> None:
        """Post each update of one submission to the outbox, then how it ended."""
        sent: dict[str, object] = {}          # request id -> the output last encoded
        try:
            async for update in stream.updates():
                if stream.program:
                    if update.events:
                        self._outbox.post(key, ProgramUpdate(update.events), False)
                    continue
                changed = [o for o in update.outputs if o is not None and sent.get(o.request_id) is not o]
                sent.update((o.request_id, o) for o in changed)
                await self._post_outputs(key, changed, stream.done)
            if stream.program:
                await self._post_result(key, stream.result)
        except Exception as e:                # RequestFailed, RequestAborted, EngineDeadError
            self._outbox.post(key, WireError.of(e), True)
        finally:
            self._encoder.forget(stream.request_ids)

    async def _post_outputs(self, key: str, outputs: list, ended: bool) -> None:
        """Post what these outputs (RequestOutputs of submission `key`) gained; a prefill replica
        hands off those that wait for it."""
        self._outbox.post(key, [self._encoder.encode(o) for o in outputs], ended)

    async def _post_result(self, key: str, result) -> None:
        """Post a program's result, which ends submission `key`; a prefill replica moves a prompt's
        KV to the object store first."""
        self._outbox.post(key, ProgramUpdate([], result), True)

    # -- observation and lifecycle ----------------------------------------------------------------
    async def health(self) -> dict:
        engine = self.engine
        return {"healthy": engine.healthy, "error": None if engine.error is None else repr(engine.error),
                "stats": engine.stats, "num_in_flight": engine.num_in_flight}

    async def metrics_text(self) -> bytes:
        """This replica's Prometheus metrics (the front end relabels and merges them)."""
        return self.metrics.render()

    async def drain(self, timeout: float) -> None:
        """Take no new request; let those in flight finish for up to `timeout` s, then abort them."""
        await self.engine.drain(timeout)

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine thread (the front end then ends the actor)."""
        await self.engine.shutdown()
        if self._channel is not None:
            self._channel.close()
