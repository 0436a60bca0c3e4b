"""Running model-written Python (program-of-thought answers, code candidates against their tests)
where it can do no harm: a subprocess with CPU-time, memory, output-size and wall-clock limits, a
throwaway working directory, a bare environment, and no network.

The network is cut by running the child in fresh user and network namespaces (`unshare -rn`: only a
loopback that is down) where the machine allows it; elsewhere a prelude replaces the socket
module's connecting calls before the code runs (a blocking fallback: it stops the code from
connecting, not a determined escape). A run that fails, is killed or times out returns ok=False,
so a caller gives it no vote.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache

_PRELUDE = """\
import socket as _s
def _refuse(*a, **k):
    raise OSError(101, "network access is disabled in the sandbox")
_s.socket.connect = _s.socket.connect_ex = _s.socket.sendto = _refuse
_s.create_connection = _s.getaddrinfo = _refuse
del _s, _refuse
"""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    output_bytes: int = 1 << 16      # stdout and stderr, each


@dataclass
class SandboxResult:
    ok: bool                  # exited with status 0 within the limits
    stdout: str
    stderr: str
    returncode: int | None    # None: killed at the wall-clock limit
    reason: str | None = None # why not ok: "timeout", "exit 1", "signal 9", "output limit"


def run_python(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a Python script in the sandbox and return what it printed."""
    workdir = tempfile.mkdtemp(prefix="ponder-sandbox-")
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w") as f:
            f.write(code if network_isolated() else _PRELUDE + code)
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        argv = [sys.executable, "-I", "-B", script]
        if network_isolated():
            argv = ["unshare", "-rn", *argv]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    env=_environment(workdir), preexec_fn=lambda: _limit(limits),
                                    start_new_session=True)
            try:
                proc.communicate(stdin.encode(), timeout=limits.wall_s)
                returncode, reason = proc.returncode, None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode, reason = None, "timeout"
        stdout, stderr = _read(out_path, limits), _read(err_path, limits)
        if reason is None and returncode != 0:
            reason = (f"signal {-returncode}" if returncode < 0 else f"exit {returncode}")
            if returncode == -signal.SIGXFSZ:
                reason = "output limit"
        return SandboxResult(reason is None, stdout, stderr, returncode, reason)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@cache
def network_isolated() -> bool:
    """Whether this machine lets an unprivileged process take network namespaces of its own."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _limit(limits: SandboxLimits) -> None:
    """In the child before exec: its CPU time, address space and file sizes (the outputs)."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _read(path: str, limits: SandboxLimits) -> str:
    with open(path, "rb") as f:
        return f.read(limits.output_bytes).decode("utf-8", errors="replace")
