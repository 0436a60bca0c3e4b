"""What a front end keeps on the serving event loop: its background tasks (replacements, drains,
hand-offs, the health watch), started and cancelled in one place, and a drain that a signal handler
or another thread may request."""

from __future__ import annotations

import asyncio


class LoopTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _background(self, work) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def request_drain(self, timeout: float) -> None:
        """Thread- and signal-safe: schedule `drain(timeout)` on the serving event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._background(self.drain(timeout)))

    async def drain(self, timeout: float) -> None:
        raise NotImplementedError
