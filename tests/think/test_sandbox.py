"""The sandbox that runs model-written Python: it returns what the code prints, and contains what
the code must not do (connect, run forever, eat memory, flood output, litter the disk)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from ponder.think import sandbox
from ponder.think.sandbox import SandboxLimits, network_isolated, run_python


def test_prints_come_back_and_failures_are_not_ok():
    ok = run_python("import sys\nprint(sum(range(10)))\nprint(sys.stdin.read().upper())", stdin="hi")
    assert ok.ok and ok.stdout.split() == ["45", "HI"]
    bad = run_python("raise ValueError('nope')")
    assert not bad.ok and bad.reason == "exit 1" and "ValueError" in bad.stderr


@pytest.mark.parametrize("isolation", ["namespace", "fallback"])
def test_a_connect_from_the_sandbox_fails(monkeypatch, isolation):
    if isolation == "fallback":            # a machine without network namespaces: the prelude blocks it
        monkeypatch.setattr(sandbox, "network_isolated", lambda: False)
    elif not network_isolated():
        pytest.skip("this machine gives no network namespace to an unprivileged process")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    server.close()
    assert not result.ok and "connected" not in result.stdout and not accepted
    assert "OSError" in result.stderr or "Error" in result.stderr


def test_limits_end_runaway_code():
    limits = SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256, output_bytes=1 << 12)
    spin = run_python("while True: pass", limits=limits)
    assert not spin.ok and spin.reason in ("timeout", "signal 9", "signal 24")
    sleep = run_python("import time\ntime.sleep(30)", limits=limits)
    assert not sleep.ok and sleep.reason == "timeout"
    hog = run_python("x = bytearray(1 << 30)\nprint('allocated')", limits=limits)
    assert not hog.ok and "allocated" not in hog.stdout
    flood = run_python("print('x' * 100000)", limits=limits)
    assert not flood.ok and len(flood.stdout) <= 1 << 12


def test_the_working_directory_is_thrown_away():
    where = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())").stdout.strip()
    assert where and not os.path.exists(where)
