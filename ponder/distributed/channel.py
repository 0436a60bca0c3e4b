"""How the front end reaches a replica's requests: a link per replica, over one of two channels.

Ray is the control plane — it places the replicas, starts them, checks their health, collects their
metrics, drains and ends them. The data plane — submitting requests, aborting them, and the batches
of outputs coming back — goes over a `SocketLink` by default: one TCP connection from the front end
to a server the replica opens on its node's address (the address Ray uses for it: 127.0.0.1 in a
loopback cluster), length-prefixed pickle frames both ways. An actor call costs ≈ 1.4 ms here and a
streamed item ≈ 0.5 ms more, most of it Ray's own machinery; a frame over loopback TCP costs tens of
microseconds, and a 1-token request pays for two hops. (vLLM splits the same way: Ray actors for
its engine cores, ZeroMQ sockets between them and the API server.)

The connection is authenticated by a random token the front end gives the replica at start (its
first frame must be that token, sent raw: nothing is unpickled before it matches); the server takes
one connection. The replica's process dying
closes it, which fails that replica's requests at once.

A `RayLink` is the same interface over actor calls and the replica's `updates()` streaming
generator. The P/D replicas use it: their hand-offs carry object references, which only Ray's own
channel may move (one pickled anywhere else would pin its KV in the object store for good).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import struct
from typing import AsyncIterator

logger = logging.getLogger("ponder.distributed")

_HEADER = struct.Struct("!I")               # a frame: its length, then one pickle


class ChannelClosed(ConnectionError):
    """The connection to a replica ended (its process died, or the link was closed)."""


_CLOSED = "the connection to the replica closed"


def write_frame(writer: asyncio.StreamWriter, message: object) -> None:
    write_raw(writer, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


async def read_frame(reader: asyncio.StreamReader) -> object:
    return pickle.loads(await read_raw(reader))


async def read_raw(reader: asyncio.StreamReader, limit: int | None = None) -> bytes:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if limit is not None and size > limit:
        raise ConnectionError(f"a frame of {size} bytes where at most {limit} were expected")
    return await reader.readexactly(size)


def write_raw(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(_HEADER.pack(len(data)) + data)


# -- the replica's side ---------------------------------------------------------------------------
class ChannelServer:
    """The replica's end: runs `replica.<method>(*args)` for each call frame (methods in
    `methods` only), answers it, and sends whatever `next_batch()` returns as it comes."""

    def __init__(self, replica, methods: frozenset[str], next_batch, token: bytes):
        self.replica, self.methods, self.next_batch, self.token = replica, methods, next_batch, token
        self.server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None   # the front end's connection, once it came

    async def start(self, host: str) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, 0)
        return host, self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:                                        # the token comes raw: nothing is unpickled before it
            token = await asyncio.wait_for(read_raw(reader, limit=len(self.token)), 5.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            token = None
        if self._writer is not None or token is None or not hmac.compare_digest(token, self.token):
            writer.close()                          # one front end per replica, and only with the token
            return
        self._writer = writer
        sender = asyncio.get_running_loop().create_task(self._send_batches(writer))
        answering: set[asyncio.Task] = set()
        try:
            while True:
                call_id, method, args = await read_frame(reader)
                task = asyncio.get_running_loop().create_task(self._answer(writer, call_id, method, args))
                answering.add(task)
                task.add_done_callback(answering.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                    # the front end went away
        finally:
            sender.cancel()
            writer.close()

    def close(self) -> None:
        """Stop listening and end the connection (the front end sees ChannelClosed)."""
        if self.server is not None:
            self.server.close()
        if self._writer is not None:
            self._writer.close()

    async def _answer(self, writer, call_id, method: str, args: tuple) -> None:
        from ponder.distributed.wire import WireError

        try:
            if method not in self.methods:
                raise ValueError(f"{method!r} is not a replica call")
            result = await getattr(self.replica, method)(*args)
        except Exception as e:                      # (the replica's calls answer their own errors)
            logger.exception("replica call %s failed", method)
            result = WireError.of(e)
        if call_id is not None:                     # (None: a notification, such as an abort)
            write_frame(writer, ("reply", call_id, result))

    async def _send_batches(self, writer: asyncio.StreamWriter) -> None:
        while True:
            write_frame(writer, ("batch", None, await self.next_batch()))
            await writer.drain()


# -- the front end's side ----------------------------------------------------------------------------
class SocketLink:
    """The front end's end of a replica's ChannelServer. `batches()` (one reader: the front end's
    pump for the replica) connects, then reads; calls wait for the connection."""

    def __init__(self, address: tuple[str, int], token: bytes):
        self.address, self.token = address, token
        self._writer: asyncio.StreamWriter | None = None
        self._connected: asyncio.Future | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    async def call(self, method: str, *args):
        """`replica.<method>(*args)`'s result; ChannelClosed if the connection ends first."""
        writer = await self._connection()
        if writer.is_closing():
            raise ChannelClosed(_CLOSED)
        call_id = next(self._ids)
        self._pending[call_id] = answer = asyncio.get_running_loop().create_future()
        try:
            write_frame(writer, (call_id, method, args))
            return await answer
        finally:
            self._pending.pop(call_id, None)

    def notify(self, method: str, *args) -> None:
        """Call `replica.<method>(*args)` without waiting for it (dropped if not connected)."""
        if self._writer is not None and not self._writer.is_closing():
            write_frame(self._writer, (None, method, args))

    async def batches(self) -> AsyncIterator[list]:
        """Each batch of entries the replica sends, in order; ChannelClosed when the connection ends."""
        try:
            reader, writer = await asyncio.open_connection(*self.address)
            write_raw(writer, self.token)
        except OSError as e:
            error = ChannelClosed(f"cannot connect to the replica at {self.address}: {e}")
            self._connection_future().set_exception(error)
            raise error from None
        self._writer = writer
        self._connection_future().set_result(writer)
        try:
            while True:
                try:
                    kind, call_id, payload = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as e:
                    raise ChannelClosed(f"its connection closed ({type(e).__name__})") from None
                if kind == "reply":
                    answer = self._pending.get(call_id)
                    if answer is not None and not answer.done():
                        answer.set_result(payload)
                else:
                    yield payload
                    del payload
        finally:
            self.close()

    def close(self) -> None:
        """End the connection; calls waiting for an answer get ChannelClosed."""
        if self._writer is not None:
            self._writer.close()
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ChannelClosed(_CLOSED))
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(ChannelClosed(_CLOSED))
            self._connected.exception()             # (retrieved: nobody may be waiting)

    def _connection_future(self) -> asyncio.Future:
        if self._connected is None:
            self._connected = asyncio.get_running_loop().create_future()
        return self._connected

    async def _connection(self) -> asyncio.StreamWriter:
        return await asyncio.shield(self._connection_future())


class RayLink:
    """The same interface over Ray: actor calls, and the replica's `updates()` generator."""

    def __init__(self, actor):
        self.actor = actor

    def call(self, method: str, *args):
        return getattr(self.actor, method).remote(*args)       # an ObjectRef: awaitable

    def notify(self, method: str, *args) -> None:
        getattr(self.actor, method).remote(*args)

    async def batches(self) -> AsyncIterator[list]:
        async for ref in self.actor.updates.remote():
            entries = await ref
            del ref              # nothing here pins a batch (and a hand-off's KV in it) past delivery
            yield entries
            del entries

    def close(self) -> None:
        pass
