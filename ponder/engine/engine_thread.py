"""The thread that builds the engine and runs its loop (one OpenMP master thread)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Callable


class EngineThread:
    """One long-lived thread that builds the engine and later runs its loop, so that every torch
    op and native kernel of the engine has the same OpenMP master thread.

    GNU OpenMP keeps a thread team per master thread. If the model loads on the main thread and
    the loop runs on another, a 2-core machine carries more OpenMP threads than cores, and libgomp
    then throttles its spin-waits: every parallel region of the loop ran ~1.5x slower, and
    single-stream decode in the server fell to 20 tok/s against 35 offline (measured here).
    """

    def __init__(self, name: str = "ponder-engine"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable, *args, **kwargs):
        """Run fn on the engine thread and return its result (e.g. build the LLMEngine)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable) -> Future:
        return self._executor.submit(fn)


class LoopOnEngineThread:
    """The start/join/is_alive of a threading.Thread, for the loop run on an EngineThread."""

    def __init__(self, engine_thread: EngineThread, target: Callable[[], None]):
        self._engine_thread, self._target = engine_thread, target
        self._future: Future | None = None

    def start(self) -> None:
        self._future = self._engine_thread.submit(self._target)

    def join(self) -> None:
        if self._future is not None:
            futures_wait([self._future])

    def is_alive(self) -> bool:
        return self._future is not None and not self._future.done()
