"""The one way the tests start Ray: offline, private, and stopped by pid.

Every Ray process of the test suite runs under scripts/offline-ray (a loopback-only
network namespace, no usage stats, no token auth, a HOME whose ray_bootstrap_config.yaml
stops the cloud-metadata probe, RAY_TMPDIR in a temporary folder): the suite's own
test_ray_suite_runs_offline starts a pytest there for the tests marked ``ray``, and
``inside()`` is how a test knows it is in it. Nothing here calls ``ray stop`` (it kills by
process name across the machine) or address="auto" (it looks for any gcs_server).
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "offline-ray"
CPUS = 4  # the tests' Ray: two Batchers of two workers, or one of four, fit at once
OBJECT_STORE_BYTES = 128 << 20


def installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def can_isolate() -> bool:
    """This user can make a network namespace (scripts/offline-ray's `unshare -n`)."""
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def inside() -> bool:
    """This process runs under scripts/offline-ray, in its own network namespace."""
    if os.environ.get("MPBATCH_OFFLINE_RAY") != "1":
        return False
    names = {name for _, name in socket.if_nameindex()}
    return names == {"lo"}


def start_local() -> None:
    """The Ray the tests of one module share (one start per module, ~3 s)."""
    import ray

    assert inside(), "Ray may start only under scripts/offline-ray"
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})


def actors() -> list[psutil.Process]:
    """mpbatch's actor processes on this machine (their title is ray::RayWorker...)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or ())
        if line.startswith("ray::RayWorker"):
            found.append(p)
    return found


def processes_under(folder: str) -> list[psutil.Process]:
    """Every process of a Ray started with ``folder`` as its temp dir (RAY_TMPDIR or
    --temp-dir), and their descendants; never this one. gcs_server and the raylet name the
    folder in their command line; the agents retitle themselves (ray::DashboardAgent),
    which wipes their environment, and outlive a raylet that dies: their open log files
    are in the folder."""
    found: dict[int, psutil.Process] = {}
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or ())
        if p.pid in mine or "ray" not in line:
            continue
        if folder in line or _holds_files_in(p, folder):
            found[p.pid] = p
            try:
                for child in p.children(recursive=True):
                    found[child.pid] = child
            except psutil.Error:
                pass
    return list(found.values())


def _holds_files_in(p: psutil.Process, folder: str) -> bool:
    try:
        return any(f.path.startswith(folder) for f in p.open_files())
    except psutil.Error:
        return False


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL (SIGTERM would start Ray's 30 s drain) and reap what is ours to reap."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=5)


def kill_ray_under(folder: str) -> None:
    """Kill a Ray started with ``folder`` until none of it is left: a raylet still alive
    at the first look may start an agent after it."""
    for _ in range(5):
        procs = processes_under(folder)
        if not procs:
            return
        kill_all(procs)
    raise AssertionError(f"Ray processes under {folder} keep coming back")


class Head:
    """A cluster head started with `ray start --head`, as a user would, in a private temp
    dir; stop() kills its process tree by pid."""

    def __init__(self, port: int) -> None:
        # In /tmp: Ray's socket paths under it must stay within 107 bytes.
        self.folder = tempfile.mkdtemp(prefix="mpbatch-", dir="/tmp")
        ray_bin = Path(sys.executable).with_name("ray")
        subprocess.run(  # RAY_TMPDIR too: processes_under() finds the agents by it
            [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={self.folder}"],
            check=True, capture_output=True, timeout=120,
            env={**os.environ, "RAY_TMPDIR": self.folder})
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        kill_ray_under(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)
