"""Sweeps against a real SLURM: the one-node cluster `tests/cluster/start_slurm.sh` starts (`make slurm`, part of
`make test`). Where it cannot start (no root, no apt-get), the tests that need it skip with the script's reason."""
from __future__ import annotations
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ALLOCATED = "from stmn.recipes import allocated_cpus, auto_workers; print(allocated_cpus(), auto_workers('cuda', gpus=1))"

pytestmark = pytest.mark.slow                     # `make test-fast` leaves this module out


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
    from stmn.slurm import slurm_resources
    refused = subprocess.run(["sbatch", "--test-only", "--gpus-per-node=1", "--wrap", "true"], capture_output=True, text=True)
    assert refused.returncode != 0 and "gres" in refused.stderr.lower()
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"))
    ex.update_parameters(**slurm_resources("smoke", cpus_per_task=1, time_min=5))
    assert ex.submit(allocated_cpus).result() == 1


def test_a_bad_partition_shows_sbatchs_message_and_submits_nothing(slurm, tmp_path):
    import submitit
    from stmn.recipes import allocated_cpus
    from stmn.slurm import slurm_resources
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"))
    ex.update_parameters(**slurm_resources("smoke", partition="nope"))
    with pytest.raises(Exception, match="(?i)invalid partition"):
        ex.submit(allocated_cpus)
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() == before


def test_executor_slurm_without_slurm_suggests_local(tmp_path, monkeypatch):
    from stmn.executors import run_slurm
    monkeypatch.setenv("PATH", str(tmp_path))                       # no sbatch on it
    with pytest.raises(RuntimeError, match="executor='local'"):
        run_slurm([{"name": "x"}], tmp_path, ROOT / "nbs/train.ipynb")


def test_wait_false_submits_returns_and_reports(slurm, tmp_path):
    "`wait=False` returns with the job ids; a second call submits nothing still queued or done; the status table follows."
    from test_sweep import fake_notebook
    from stmn.slurm import slurm_resources
    from stmn.sweep import plan
    from stmn.executors import run_slurm, sweep_status
    nb, out = fake_notebook(tmp_path / "fake.ipynb"), tmp_path / "out"
    runs = plan("table3", "smoke", 1)[:2]
    resources = slurm_resources("smoke", cpus_per_task=1, time_min=5)
    jobs = run_slurm(runs, out, nb, cwd=ROOT, slurm=resources, wait=False)
    first = sweep_status(runs, out)
    assert list(first.job) == [j.job_id for j in jobs] and set(first.status) <= {"pending", "running", "done"}
    assert run_slurm(runs, out, nb, cwd=ROOT, slurm=resources, wait=False) == []      # queued or done: not submitted again
    assert [j.result() for j in jobs] == ["done", "done"]
    assert list(sweep_status(runs, out).status) == ["done", "done"]


# ---------------------------------------------------------------------------------------------------------------------
# The ends of a task, for real: a time limit, `scontrol requeue`, `scancel`; and torchrun inside one task. One campaign
# submits them all at once (they overlap on the cluster), then each test reads what its runs left on disk.

TIMED_SIGNAL_S = 8        # SIGUSR2 this long before the 1-minute limit; ¾ of it is what the step in progress and its
                          # checkpoint get before the task asks to be requeued: a steady step, not the slow first one

TRAIN = dict(dataset="synth", backbone="resnet10", pretrained=False, height=32, width=16, P=4, K=2, L=4, epochs=3,
             lr_step=100, test_sampling="rrs", workers=0, ckpt_every=6)      # 36 steps of about 0.6 s on one CPU


def train_run(name, **change):
    return dict(name=name, preset="smoke", trial=0, tables=[], **{**TRAIN, **change})


def sleeper_notebook(path):
    "A stand-in training notebook: sleeps `seconds`, then writes metrics.json."
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "stmn", "display_name": "Python (stmn)", "language": "python"}
    params = nbformat.v4.new_code_cell("seconds = 0\nout_dir = ''\ntrial = 0")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell("import json, pathlib, time\ntime.sleep(seconds)\n"
                                     "pathlib.Path(out_dir, 'metrics.json').write_text(json.dumps(dict(rank1=1, mAP=1)))")
    nb.cells = [params, body]
    nbformat.write(nb, str(path))
    return path


def wait_until(condition, timeout, what):
    t0 = time.time()
    while not condition():
        if time.time() - t0 > timeout: raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def campaign(slurm, tmp_path_factory):
    """Submit at once: `timed` (time limit 1 min, SIGUSR2 5 s before it), `requeued` (requeued by `scontrol` after its
    first checkpoint), `straight` (the same training, never interrupted), `ddp` (nproc 2 in one task), and a sweep of
    two sleepers of which `cancelled` is `scancel`led while running. Returns when nothing is queued any more."""
    from stmn.base import read_events
    from stmn.slurm import slurm_resources
    from stmn.executors import run_slurm, sweep_status
    out, nb = tmp_path_factory.mktemp("campaign"), ROOT / "nbs/train.ipynb"
    cpu1 = dict(cpus_per_task=1, mem_gb=2)
    timed = [train_run("timed")]
    run_slurm(timed, out, nb, cwd=ROOT, slurm=slurm_resources("smoke", time_min=1, signal_s=TIMED_SIGNAL_S, max_requeues=10, **cpu1),
              wait=False)
    pair = [train_run("requeued"), train_run("straight")]
    run_slurm(pair, out, nb, cwd=ROOT, slurm=slurm_resources("smoke", time_min=10, **cpu1), wait=False)
    ddp = [train_run("ddp", nproc=2, epochs=1, ckpt_every=0)]
    run_slurm(ddp, out, nb, cwd=ROOT, slurm=slurm_resources("smoke", time_min=10, cpus_per_task=2, mem_gb=4), wait=False)
    sleepers = [dict(name="cancelled", preset="smoke", trial=0, tables=[], seconds=600),
                dict(name="finishes", preset="smoke", trial=0, tables=[], seconds=20)]
    sleeper = sleeper_notebook(out / "sleeper.ipynb")
    sweep_args = dict(out_dir=out / "sweep", notebook=sleeper, cwd=ROOT, slurm=slurm_resources("smoke", time_min=10, cpus_per_task=1, mem_gb=1))
    run_slurm(sleepers, wait=False, **sweep_args)

    runs = out / "runs"
    job = lambda run_dir: json.loads((run_dir / "slurm.json").read_text())["job_id"]
    # SLURM may send the time-limit signal up to a minute early (its event resolution), so with a 1-minute limit it can
    # land before training starts or after it ends. Once `timed` trains at its steady pace (its first checkpoint is
    # written) and no signal has stopped it yet, the test sends the same SIGUSR2 itself: the signal -> checkpoint ->
    # requeue path is taken every time, whatever SLURM's timing.
    # Both interventions are watched in one loop: `requeued` trains for about half a minute, and waiting for `timed`
    # first had let it finish before its requeue was sent.
    training = lambda: [e["event"] for e in read_events(runs / "timed")][-1:] == ["train"]
    steady = lambda: training() and (runs / "timed/checkpoint.pt").exists()
    signalled, requeue_at, t0 = False, None, time.time()
    while not (signalled and requeue_at):
        if time.time() - t0 > 420: raise TimeoutError("waited 420 s for `timed` to train and `requeued` to checkpoint")
        if not signalled and (steady() or read_events(runs / "timed", "interrupted")):
            if not read_events(runs / "timed", "interrupted"):
                subprocess.run(["scancel", "--signal=USR2", job(runs / "timed")], check=True)
            signalled = True
        if requeue_at is None and (runs / "requeued/checkpoint.pt").exists():
            requeue_at = time.time()
            subprocess.run(["scontrol", "requeue", job(runs / "requeued")], check=True)
        time.sleep(0.5)
    wait_until(lambda: read_events(out / "sweep/runs/cancelled", "job_start"), 120, "`cancelled` to start")
    subprocess.run(["scancel", job(out / "sweep/runs/cancelled")], check=True)
    active = ("pending", "running", "requeued")
    settled = lambda runs, folder: not sweep_status(runs, folder).status.isin(active).any()
    try:                                                    # what `wait_for` does, with a deadline: a stuck job fails the test
        wait_until(lambda: settled(timed + pair + ddp, out) and settled(sleepers, out / "sweep"), 900, "every run to end")
    except TimeoutError:
        subprocess.run(["scancel", "--name", "submitit"]); raise
    return dict(out=out, status=sweep_status(timed + pair + ddp, out), sweep_status=sweep_status(sleepers, out / "sweep"),
                sleepers=sleepers, sweep_args=sweep_args, requeue_at=requeue_at)


def final_state(run_dir):
    import torch
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return state, json.loads((run_dir / "metrics.json").read_text())


def timeline(run_dir):
    "The run's events as (seconds since its first start, event, details)."
    from stmn.base import read_events
    ev = read_events(run_dir)
    keep = ("job", "restarts", "signal", "epoch", "step", "resumed", "checkpointed", "waited_s")
    return [(round(e["t"] - ev[0]["t"], 1), e["event"], {k: e[k] for k in keep if k in e}) for e in ev]


def assert_resumed_equal_to_straight(campaign, name):
    runs = campaign["out"] / "runs"
    (state, metrics), (ref_state, ref_metrics) = final_state(runs / name), final_state(runs / "straight")
    assert len(state["step_losses"]) == 36 and state["step_losses"] == ref_state["step_losses"]      # bit for bit
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in ref_metrics["history"]]
    assert (metrics["rank1"], metrics["mAP"]) == (ref_metrics["rank1"], ref_metrics["mAP"])
    for (k, v), w in zip(state["model"].items(), ref_state["model"].values()): assert v.equal(w), k


def finished_run_events(campaign, name):
    "The run's timeline, printed, once it is done; and the events' names."
    events = timeline(campaign["out"] / "runs" / name)
    print("\n".join(f"{t:6.1f} s  {e:12s} {d}" for t, e, d in events))
    assert campaign["status"].set_index("name").status[name] == "done"
    return events, [e for _, e, _ in events]


def test_a_task_past_its_time_limit_checkpoints_is_requeued_and_resumes(campaign):
    """SIGUSR2 before the limit (SLURM's, or the same signal sent by the campaign while the run trains) → the step
    finishes, checkpoint → `scontrol requeue` → the task starts again and resumes."""
    events, names = finished_run_events(campaign, "timed")
    i = names.index("interrupted")                                     # a signal before training began has nothing to save
    assert names[i - 1:i + 2] == ["signal", "interrupted", "requeue"] and events[i + 1][2]["checkpointed"]
    stop = events[i][2]
    assert stop["signal"] == "SIGUSR2" and stop["epoch"] * 12 + stop["step"] > 0
    resumed = [d for _, e, d in events[i:] if e == "train"][0]
    assert resumed["resumed"] and (resumed["epoch"], resumed["step"]) == (stop["epoch"], stop["step"])
    assert events[i + 2][1] == "job_start" and events[i + 2][2]["restarts"] >= 1
    assert "trained" in names[i:]           # then done (a later signal while it evaluates may requeue it once more)
    assert_resumed_equal_to_straight(campaign, "timed")


def test_scontrol_requeue_restarts_a_task_from_its_checkpoint(campaign):
    "What preemption does: SIGTERM → checkpoint at the step in progress; the task starts again and resumes from it."
    events, names = finished_run_events(campaign, "requeued")
    stop = [d for _, e, d in events if e == "interrupted"]
    assert stop and stop[0]["signal"] == "SIGTERM"
    assert stop[0]["epoch"] * 12 + stop[0]["step"] > 0          # after the first checkpoint: step 0 of a later epoch counts
    restarts = [d for _, e, d in events if e == "job_start"]
    assert [d["restarts"] for d in restarts] == [0, 1]
    resumed = [d for _, e, d in events if e == "train"][1]
    assert resumed["resumed"] and (resumed["epoch"], resumed["step"]) == (stop[0]["epoch"], stop[0]["step"])
    assert names[-1] == "trained" and not (campaign["out"] / "runs/requeued/error.json").exists()
    assert_resumed_equal_to_straight(campaign, "requeued")


def test_scancel_fails_one_task_the_others_finish_and_a_rerun_submits_only_it(campaign):
    from stmn.executors import run_slurm, sweep_status
    st = campaign["sweep_status"].set_index("name")
    assert st.status["finishes"] == "done" and st.status["cancelled"] == "failed", st
    again = run_slurm(campaign["sleepers"], wait=False, **campaign["sweep_args"])
    try:
        assert len(again) == 1
        now = sweep_status(campaign["sleepers"], campaign["sweep_args"]["out_dir"]).set_index("name")
        assert now.job["cancelled"] == again[0].job_id and now.status["cancelled"] in ("pending", "running", "requeued")
        assert now.status["finishes"] == "done"
    finally:
        subprocess.run(["scancel", *[j.job_id for j in again]])


def test_torchrun_with_two_processes_inside_one_task(campaign):
    "`nproc 2`: the notebook launches torchrun (gloo on the CPU) within the task's allocation; rank 0 writes the metrics."
    run_dir = campaign["out"] / "runs/ddp"
    assert campaign["status"].set_index("name").status["ddp"] == "done", (run_dir / "error.json").read_text() if (run_dir / "error.json").exists() else ""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["params"]["nproc"] == 2 and 0 < metrics["mAP"] <= 1
