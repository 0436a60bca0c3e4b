"""Ray for ponder: a local cluster kept on loopback, or a cluster the user started, joined by address.

A default `ray.init()` (Ray 2.60) binds the node's external address, and its dashboard process
probes cloud-metadata addresses. A local cluster here is therefore started only with the loopback
settings (../shared/RAY.md): environment variables set before the first `import ray` (one is read at
import), a bootstrap HOME whose `ray_bootstrap_config.yaml` is `{}` (the dashboard process then skips
its probe), no dashboard, a small object store and a temp folder of our own, which is wiped at the
end. Joining a cluster at a loopback address (127.x, localhost) applies the same settings; joining
another address is the user's multi-node cluster, reached with Ray's own defaults.

The loopback settings change HOME, and ponder's cache folder (built kernels, converted weights)
defaults to ~/.cache/ponder: it is resolved before HOME changes and handed on as $PONDER_CACHE_DIR,
which the cache code honours (kernels/__init__.py, config.py) and the replicas inherit (on a local
cluster every worker inherits the driver's environment, PYTHONPATH included), so they rebuild nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

logger = logging.getLogger("ponder.distributed")

OBJECT_STORE_BYTES = 256 << 20
CACHE_ENV = "PONDER_CACHE_DIR"
# read by Ray at import or by the processes it spawns: see ../shared/RAY.md
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}


class ClusterError(RuntimeError):
    """Ray could not be started or joined as asked (the message says why)."""


def ponder_cache_dir() -> str:
    """ponder's cache folder as the cache code resolves it now (call before HOME changes)."""
    return os.path.abspath(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ponder"))


def is_loopback_address(address: str) -> bool:
    """True for "127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001" and the like."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RayCluster:
    """A connection to Ray: a local loopback cluster (`address` None) or a joined one.

    Use as a context manager, or call `start()` and `stop()`; `stop()` shuts Ray down (a local
    cluster's processes end with it), wipes the folder the loopback settings used and restores the
    environment they changed. `num_cpus` is the local cluster's logical CPUs (default: the cores).
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int = OBJECT_STORE_BYTES
    node_ip_address: str | None = field(default=None, init=False)
    _folder: str | None = field(default=None, init=False, repr=False)
    _saved_env: dict = field(default_factory=dict, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def folder(self) -> str | None:
        """The folder of the loopback settings (bootstrap HOME and Ray's temp folder), while started."""
        return self._folder

    @property
    def loopback(self) -> bool:
        return self.address is None or is_loopback_address(self.address)

    def start(self) -> "RayCluster":
        if self._started:
            raise ClusterError("this Ray connection is already started")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ClusterError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.loopback:
            self._set_loopback_env()
        try:
            self._init()
        except BaseException:
            self._cleanup()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Shut Ray down and clean up after it; safe to call twice."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        self._cleanup()

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- resources ------------------------------------------------------------------------------
    def cpus(self) -> tuple[float, float]:
        """(CPUs in the cluster, CPUs free now)."""
        import ray

        return ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)

    # -- internals ------------------------------------------------------------------------------
    def _set_loopback_env(self) -> None:
        import sys

        if "ray" in sys.modules and sys.modules["ray"]._private.ray_constants.ENABLE_RAY_CLUSTER:
            raise ClusterError("ray was imported before the loopback settings were made; "
                               "start ponder's RayCluster before anything imports ray")
        self._folder = tempfile.mkdtemp(prefix="ponder-ray-")     # short: Ray's socket paths must fit
        home = os.path.join(self._folder, "home")
        os.makedirs(home)
        with open(os.path.join(home, "ray_bootstrap_config.yaml"), "w") as f:
            f.write("{}\n")
        env = {**LOOPBACK_ENV, CACHE_ENV: ponder_cache_dir(), "HOME": home}   # the cache before HOME
        self._saved_env = {name: os.environ.get(name) for name in env}
        os.environ.update(env)

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            raise ClusterError("Ray is already initialized in this process")
        options = dict(include_dashboard=False, log_to_driver=False)
        if self.address is None:
            options.update(num_cpus=self.num_cpus or os.cpu_count() or 1,
                           object_store_memory=self.object_store_memory,
                           _temp_dir=os.path.join(self._folder, "tmp"))
        else:
            options.update(address=self.address)
        saved = _signal_handlers()
        try:
            context = ray.init(**options)
        except ConnectionError as e:
            raise ClusterError(f"could not join the Ray cluster at {self.address}: {e}") from None
        finally:
            _restore_signal_handlers(saved)
        self.node_ip_address = context.address_info["node_ip_address"]
        if self.loopback and self.node_ip_address != "127.0.0.1":
            ray.shutdown()
            raise ClusterError(f"Ray's node is at {self.node_ip_address}, not loopback (127.0.0.1)")
        logger.info("Ray %s at %s (node %s)", "joined" if self.address else "started",
                    context.address_info.get("gcs_address"), self.node_ip_address)

    def _cleanup(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    @property
    def gcs_address(self) -> str:
        """The address other drivers join this cluster at (`--ray-address`)."""
        import ray

        return ray.get_runtime_context().gcs_address


def check_cpus(num_replicas: int, cpus_each: int, what: str = "replicas") -> None:
    """ClusterError unless the connected cluster has `num_replicas * cpus_each` CPUs free."""
    import ray

    total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
    if num_replicas * cpus_each > free:
        raise ClusterError(f"{what} of {cpus_each} CPU(s) each need {num_replicas * cpus_each} CPUs, but the Ray "
                           f"cluster has {free:g} free (of {total:g}): start fewer replicas, give each fewer CPUs, "
                           f"or join a bigger cluster")


# ray.init makes SIGTERM exit the process at once (status 15, or 1 after killing the node's
# processes); the process's owner (`ponder serve`: drain, then stop) keeps its own handlers, and
# stop() ends the cluster's processes.
_SIGNALS = ("SIGTERM", "SIGINT")


def _signal_handlers() -> dict:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {name: signal.getsignal(getattr(signal, name)) for name in _SIGNALS}


def _restore_signal_handlers(saved: dict) -> None:
    import signal

    for name, handler in saved.items():
        if name == "SIGTERM" and handler is signal.SIG_DFL:
            # the default would kill the driver while replicas start, leaving Ray's processes and
            # folder behind; an exception unwinds through RayCluster's exit, which removes them
            handler = _exit_on_sigterm
        if handler is not None:
            signal.signal(getattr(signal, name), handler)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
