"""Replica health: how the front end asks a replica how it is, and when it gives up on it.

Every `interval` seconds each serving replica is asked for its health (answered on the replica's
event loop, so a replica whose loop is stuck does not answer). A replica whose engine loop has
failed, whose actor is gone, or that misses `max_missed` answers in a row is lost; replacing it is
the front end's business (frontend.py). A dead process is usually noticed sooner, when its update
channel breaks.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Callable

import ray


@dataclass
class HealthPolicy:
    interval: float = 1.0        # seconds between two checks of a replica
    timeout: float = 5.0         # seconds a replica gets to answer (a check, a drain's end, metrics)
    max_missed: int = 3          # checks in a row without an answer before it is lost


async def check(replica, policy: HealthPolicy) -> str | None:
    """Why `replica` (frontend.Replica) is lost, or None; its last report is kept on it."""
    try:
        report = await within(replica.actor.health.remote(), policy.timeout)
    except asyncio.TimeoutError:
        replica.missed += 1
        return f"it missed {replica.missed} health checks in a row" if replica.missed >= policy.max_missed else None
    except ray.exceptions.RayError as e:
        return describe(e)
    replica.missed, replica.health = 0, report
    return None if report["healthy"] else f"its engine failed: {report['error']}"


async def watch(replicas: Callable[[], list], policy: HealthPolicy, lost: Callable[[object, str], None]) -> None:
    """Check `replicas()` every interval, forever; call `lost(replica, why)` for each one lost."""
    while True:
        await asyncio.sleep(policy.interval)
        checked = replicas()
        reasons = await asyncio.gather(*(check(r, policy) for r in checked))
        for replica, reason in zip(checked, reasons):
            if reason is not None:
                lost(replica, reason)


async def within(ref, timeout: float):
    """The value of a Ray call (an ObjectRef), or asyncio.TimeoutError after `timeout` seconds."""
    return await asyncio.wait_for(asyncio.ensure_future(ref), timeout)


def describe(error: BaseException) -> str:
    """A Ray error in one line: its cause's type and message, without the traceback."""
    cause = getattr(error, "cause", None)          # a task's own exception
    if isinstance(cause, BaseException) and cause is not error:
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    if getattr(error, "actor_init_failed", False) and lines:
        return lines[-1]                           # the actor's __init__ failed: its error ends the traceback
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
