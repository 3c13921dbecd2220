"""Submitting the project's SLURM scripts to the test cluster and watching their jobs, with bounded waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT

JOB_WITHIN_S = 180
BATCH_OF_2_ON_2_CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def lseg_environment(**extra: str) -> dict[str, str]:
    """This interpreter's `lseg` first on PATH and this checkout's sources on its path (exported to jobs)."""
    path = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    binaries = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {"PYTHONPATH": path, "PATH": binaries, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def sbatch(slurm_env: dict[str, str], work: Path, script: str, options: list[str], args: list[str]) -> str:
    """`sbatch scripts/slurm/SCRIPT ARGS` (the script unedited, the CPU shape as `options`) from `work`;
    the job id."""
    (work / "runs" / "slurm").mkdir(parents=True, exist_ok=True)  # the scripts' --output folder
    job = subprocess.run(
        ["sbatch", "--parsable", *options, f"--chdir={work}", str(REPO_ROOT / "scripts" / "slurm" / script),
         *args],
        env={**slurm_env, **lseg_environment()}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


def job_state(slurm_env: dict[str, str], job: str) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=slurm_env, capture_output=True, text=True, timeout=30
    )
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def wait_until(slurm_env: dict[str, str], job: str, states: set[str], within_s: float = JOB_WITHIN_S) -> dict:
    """The job's fields once its state is one of `states`; fails after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        fields = job_state(slurm_env, job)
        if fields.get("JobState") in states:
            return fields
        time.sleep(0.5)
    pytest.fail(f"job {job} not {' or '.join(states)} within {within_s} s: {fields}\n"
                + controller_log(slurm_env, job)[-3000:])  # fmt: skip


def job_output(work: Path) -> str:
    return "\n".join(path.read_text() for path in (work / "runs" / "slurm").glob("*.out"))


def controller_log(slurm_env: dict[str, str], job: str) -> str:
    """The controller's log lines about `job`: what a failing test prints beside the job's own output."""
    log = Path(slurm_env["SLURM_CONF"]).parent / "log" / "slurmctld.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(line for line in lines if f"JobId={job} " in line or f"job {job} " in line.lower())


def job_processes(job: str) -> list[psutil.Process]:
    """The processes running for `job` (their SLURM_JOB_ID), each with `info["environ"]`."""
    return [
        process
        for process in psutil.process_iter(["environ"])
        if (process.info["environ"] or {}).get("SLURM_JOB_ID") == job
    ]


def wait_until_cleaned_up(slurm_env: dict[str, str], job: str, within_s: float = JOB_WITHIN_S) -> None:
    """Until no process of `job` is left and the node is idle again. A requeued job waits out its
    BeginTime (two minutes) for this; a test that releases it at once must wait itself, or the new
    run is launched beside the old one's exiting processes and fails to start (exit 1, no output)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = job_processes(job)
        node = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=slurm_env, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        if not alive and node == "idle":
            return
        time.sleep(0.2)
    pytest.fail(f"job {job} still has processes or the node is not idle after {within_s} s")


def task_process(job: str, rank: int) -> psutil.Process:
    """The `lseg` process of task `rank` of a running job, found by its SLURM_JOB_ID and SLURM_PROCID."""
    found = [
        process
        for process in job_processes(job)
        if process.info["environ"].get("SLURM_PROCID") == str(rank) and "lseg" in " ".join(process.cmdline())
    ]
    assert len(found) == 1, found
    return found[0]
