"""Sweeps against a real SLURM: the one-node cluster `tests/cluster/start_slurm.sh` starts (`make slurm`, part of
`make test`). Where it cannot start (no root, no apt-get), the tests that need it skip with the script's reason."""
from __future__ import annotations
import os, shutil, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ALLOCATED = "from stmn.recipes import allocated_cpus, auto_workers; print(allocated_cpus(), auto_workers('cuda', gpus=1))"


@pytest.fixture(scope="module")
def slurm():
    "A running one-node SLURM cluster (started here if `make slurm` did not), else a skip saying why."
    run = subprocess.run(["bash", str(ROOT / "tests/cluster/start_slurm.sh")], capture_output=True, text=True)
    if shutil.which("sinfo") is None or "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout:
        pytest.skip(f"no SLURM cluster: {run.stdout.strip() or run.stderr.strip()}")


def test_workers_follow_the_affinity_mask():
    "`taskset -c 0`: one CPU allotted, so one loader per GPU (not the node's cores − 1)."
    if shutil.which("taskset") is None: pytest.skip("taskset is not installed")
    out = subprocess.run(["taskset", "-c", "0", PY, "-c", ALLOCATED], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


def test_workers_follow_the_slurm_allocation(slurm):
    "Inside a SLURM task with --cpus-per-task, without cgroups (the mask stays whole): SLURM_CPUS_PER_TASK decides."
    for cpus, expected in ((1, ["1", "1"]), (2, ["2", "1"])):
        out = subprocess.run(["srun", f"--cpus-per-task={cpus}", PY, "-c", ALLOCATED], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == expected


def test_the_smoke_preset_runs_on_a_cpu_partition(slurm, tmp_path):
    """A GPU request is refused by the CPU partition; the smoke preset's resources (no GPU) are accepted and run, and
    the job sees the CPUs it asked for."""
    import submitit
    from stmn.recipes import allocated_cpus
    from stmn.sweep import slurm_resources
    refused = subprocess.run(["sbatch", "--test-only", "--gpus-per-node=1", "--wrap", "true"], capture_output=True, text=True)
    assert refused.returncode != 0 and "gres" in refused.stderr.lower()
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"))
    ex.update_parameters(**slurm_resources("smoke", cpus_per_task=1, time_min=5))
    assert ex.submit(allocated_cpus).result() == 1


def test_a_bad_partition_shows_sbatchs_message_and_submits_nothing(slurm, tmp_path):
    import submitit
    from stmn.recipes import allocated_cpus
    from stmn.sweep import slurm_resources
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"))
    ex.update_parameters(**slurm_resources("smoke", partition="nope"))
    with pytest.raises(Exception, match="(?i)invalid partition"):
        ex.submit(allocated_cpus)
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() == before


def test_executor_slurm_without_slurm_suggests_local(tmp_path, monkeypatch):
    from stmn.sweep import run_slurm
    monkeypatch.setenv("PATH", str(tmp_path))                       # no sbatch on it
    with pytest.raises(RuntimeError, match="executor='local'"):
        run_slurm([{"name": "x"}], tmp_path, ROOT / "nbs/train.ipynb")


def test_wait_false_submits_returns_and_reports(slurm, tmp_path):
    "`wait=False` returns with the job ids; a second call submits nothing still queued or done; the status table follows."
    from test_sweep import fake_notebook
    from stmn.sweep import plan, run_slurm, slurm_resources, sweep_status
    nb, out = fake_notebook(tmp_path / "fake.ipynb"), tmp_path / "out"
    runs = plan("table3", "smoke", 1)[:2]
    resources = slurm_resources("smoke", cpus_per_task=1, time_min=5)
    jobs = run_slurm(runs, out, nb, cwd=ROOT, slurm=resources, wait=False)
    first = sweep_status(runs, out)
    assert list(first.job) == [j.job_id for j in jobs] and set(first.status) <= {"pending", "running", "done"}
    assert run_slurm(runs, out, nb, cwd=ROOT, slurm=resources, wait=False) == []      # queued or done: not submitted again
    assert [j.result() for j in jobs] == ["done", "done"]
    assert list(sweep_status(runs, out).status) == ["done", "done"]
