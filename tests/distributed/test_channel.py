"""The replicas' data-plane socket (ponder/distributed/channel.py), without Ray: calls are answered,
batches arrive in order, only the token opens it and only once, only the allowed methods run, and
a connection that ends fails what waits on it."""

from __future__ import annotations

import asyncio

import pytest

from ponder.distributed.channel import ChannelClosed, ChannelServer, SocketLink, read_frame, write_frame, write_raw
from ponder.distributed.wire import WireError

TOKEN = b"0123456789abcdef"


class FakeReplica:
    def __init__(self):
        self.batches: asyncio.Queue = asyncio.Queue()
        self.notified: list = []
        self.hold = asyncio.Event()

    async def double(self, x):
        return 2 * x

    async def slow(self):
        await self.hold.wait()

    async def note(self, value):
        self.notified.append(value)

    async def fail(self):
        raise RuntimeError("the replica's call failed")


class Explosive:
    loaded = False

    def __reduce__(self):
        return (_explode, ())


def _explode():
    Explosive.loaded = True


async def _serve(methods=frozenset({"double", "slow", "note", "fail"})):
    replica = FakeReplica()
    server = ChannelServer(replica, methods, replica.batches.get, TOKEN)
    address = await server.start("127.0.0.1")
    return replica, server, address


async def _read_batches(link: SocketLink, into: list) -> None:
    async for batch in link.batches():
        into.append(batch)


def test_calls_and_batches_over_one_connection():
    async def run():
        replica, server, address = await _serve()
        link = SocketLink(address, TOKEN)
        got: list = []
        reading = asyncio.create_task(_read_batches(link, got))
        assert await link.call("double", 21) == 42           # waits for the connection, then answers
        link.notify("note", "hi")
        replica.batches.put_nowait(["first"])
        replica.batches.put_nowait(["second"])
        for _ in range(500):
            if len(got) < 2:
                await asyncio.sleep(0.01)
        # a method outside the allowed set, or one that raises, is answered with a WireError
        for method in ("fail", "__init__"):
            answer = await link.call(method)
            assert isinstance(answer, WireError)
        assert got == [["first"], ["second"]] and replica.notified == ["hi"]
        reading.cancel()                                    # the reader stops: the link closes
        await asyncio.gather(reading, return_exceptions=True)
        with pytest.raises(ChannelClosed):
            await link.call("double", 1)
        server.close()

    asyncio.run(run())


def test_only_the_token_opens_it_and_only_once():
    async def run():
        replica, server, address = await _serve()
        for knock in (lambda w: write_raw(w, b"not the token..."),
                      lambda w: write_frame(w, Explosive())):       # a pickle first is never unpickled
            reader, writer = await asyncio.open_connection(*address)
            knock(writer)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(read_frame(reader), 5)      # closed without an answer
            writer.close()
        assert not Explosive.loaded
        first = SocketLink(address, TOKEN)
        reading = asyncio.create_task(_read_batches(first, []))
        assert await first.call("double", 1) == 2
        second = SocketLink(address, TOKEN)                      # the replica has its front end
        with pytest.raises(ChannelClosed):
            async for _ in second.batches():
                pass
        reading.cancel()
        first.close()
        server.close()

    asyncio.run(run())


def test_a_connection_that_ends_fails_the_waiting_call_and_the_reader():
    async def run():
        replica, server, address = await _serve()
        link = SocketLink(address, TOKEN)
        failure: list = []

        async def read():
            try:
                async for _ in link.batches():
                    pass
            except ChannelClosed as e:
                failure.append(e)
        reading = asyncio.create_task(read())
        waiting = asyncio.create_task(link.call("slow"))
        await asyncio.sleep(0.1)
        server.close()                                      # the replica's side of the connection ends
        await asyncio.wait_for(reading, 5)
        assert failure, "the reader must see the connection end"
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(run())


def test_a_replica_that_is_not_there_is_channel_closed():
    async def run():
        link = SocketLink(("127.0.0.1", 1), TOKEN)              # nothing listens on port 1
        waiting = asyncio.create_task(link.call("double", 1))
        with pytest.raises(ChannelClosed):
            async for _ in link.batches():
                pass
        with pytest.raises(ChannelClosed):
            await waiting

    asyncio.run(run())
