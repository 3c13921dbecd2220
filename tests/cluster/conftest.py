"""A single-node SLURM cluster on this machine, started for the cluster tests and stopped after them.

The daemons run as root from a configuration written into a temporary folder (munged with its own key
and socket, slurmctld and slurmd on free ports), so nothing of the host's own setup is read or
changed. Where they cannot start (not root, packages missing, no node idle within a minute) the tests
skip with the reason; `.ci/run` installs `slurm-wlm` and `munge` first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scontrol")
READY_WITHIN_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_configuration(folder: Path, node: str, cpus: int) -> Path:
    """slurm.conf for one node with this machine's CPUs; state, spool, logs and sockets under `folder`."""
    for name in ("state", "spool", "log"):
        (folder / name).mkdir()
    controller, daemon = free_port(), free_port()
    conf = folder / "slurm.conf"
    conf.write_text(
        f"""ClusterName=lseg-test
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={controller}
SlurmdPort={daemon}
AuthType=auth/munge
AuthInfo=socket={folder / "munge.socket"}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=10
NodeName={node} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment for SLURM commands (sbatch, srun, scontrol ...) against the running cluster."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    folder = tmp_path_factory.mktemp("slurm")
    folder.chmod(0o700)  # munged refuses a key or socket others can reach
    node, cpus = socket.gethostname(), os.cpu_count() or 1
    conf = write_configuration(folder, node, cpus)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = (folder / "log" / "daemons.out").open("w")
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={folder / 'munge.socket'}",
             f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'log' / 'munged.log'}",
             f"--seed-file={folder / 'munged.seed'}"],
            stdout=logs, stderr=logs,
        ))  # fmt: skip
        started.append(
            subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=logs, stderr=logs)
        )
        started.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env, stdout=logs, stderr=logs))
        deadline = time.monotonic() + READY_WITHIN_S
        state = ""
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in started):
                break
            try:
                probe = subprocess.run(
                    ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10
                )
                state = probe.stdout.strip()
            except subprocess.TimeoutExpired:
                state = ""
            if state == "idle":
                break
            time.sleep(0.5)
        if state != "idle":
            logs.flush()
            tail = " | ".join(path.read_text()[-300:] for path in sorted((folder / "log").glob("*")))
            pytest.skip(f"the SLURM daemons did not bring node {node} up within {READY_WITHIN_S} s "
                        f"(sinfo: {state or 'no answer'}): {tail}")  # fmt: skip
        yield env
    finally:
        for process in reversed(started):
            stop(process)
        logs.close()
