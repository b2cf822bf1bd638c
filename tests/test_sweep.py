"""Sweeps: durable runs (failures recorded, finished runs skipped, interrupted sweeps resumed), aggregation, executors."""
import json
import os
import signal
import subprocess
import sys
import time
import nbformat
import numpy as np
import pandas as pd
import pytest
from stmn.executors import run_local, sweep
from stmn.sweep import configs, plan, run_params, status
from stmn.tables import collect, table, write_tables

pytestmark = pytest.mark.slow                     # `make test-fast` leaves this module out

PARAMS = ["model", "M", "N", "alpha", "L", "spatial_memory", "temporal_memory", "spread_loss", "dataset", "split", "trial",
          "backbone", "pretrained", "height", "width", "epochs", "P", "K", "lr_step", "test_sampling", "workers", "out_dir", "device"]


def fake_notebook(path):
    """A stand-in for train.ipynb with the same parameter names: alpha 0.7 raises, alpha 1.0 kills its kernel,
    otherwise it writes metrics.json (deterministic from the parameters) atomically and counts its executions."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "stmn", "display_name": "Python (stmn)", "language": "python"}
    params = nbformat.v4.new_code_cell("\n".join(f"{p} = None" for p in PARAMS))
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os, signal, pathlib, time\n"
        "out = pathlib.Path(out_dir); out.mkdir(parents=True, exist_ok=True)\n"
        "with open(out/'executions.txt', 'a') as f: f.write('x')\n"
        "time.sleep(0.5)\n"
        "if alpha == 0.7: raise RuntimeError('this run fails on purpose')\n"
        "if alpha == 1.0: os.kill(os.getpid(), signal.SIGKILL)\n"
        "m = dict(rank1=(M + N + L + 10 * alpha + trial) / 100, mAP=(M * N + trial) / 1000, wall_seconds=1.0)\n"
        "(out/'metrics.tmp').write_text(json.dumps(m)); os.replace(out/'metrics.tmp', out/'metrics.json')\n")
    nb.cells = [params, body]
    nbformat.write(nb, str(path))
    return path


def test_failures_are_recorded_and_only_failed_runs_rerun(tmp_path):
    nb = fake_notebook(tmp_path/"fake.ipynb")
    runs = [r for r in plan("table2", "smoke", 1) if r["alpha"] in (0.3, 0.7, 1.0)]
    assert run_local(runs, tmp_path/"out", nb, workers=3) == ["done", "failed", "failed"]
    d = {r["alpha"]: tmp_path/"out/runs"/r["name"] for r in runs}
    assert "this run fails on purpose" in json.loads((d[0.7]/"error.json").read_text())["message"]
    assert "DeadKernelError" in (d[1.0]/"error.json").read_text() or "died" in (d[1.0]/"error.json").read_text().lower()
    assert run_local(runs, tmp_path/"out", nb, workers=3) == ["done", "failed", "failed"]
    assert [(d[a]/"executions.txt").read_text() for a in (0.3, 0.7, 1.0)] == ["x", "xx", "xx"]   # the finished run was skipped
    df = collect(tmp_path/"out")
    assert sorted(df.status) == ["done", "failed", "failed"] and (tmp_path/"out/runs.csv").exists()


def test_unknown_parameter_fails_before_anything_runs(tmp_path):
    nb = fake_notebook(tmp_path/"fake.ipynb")
    with pytest.raises(ValueError, match=r"declares no parameter\(s\) \['lr_typo'\]"):
        sweep("table3", "smoke", 1, tmp_path/"out", notebook=nb, extra={"lr_typo": 1e-3})
    assert not (tmp_path/"out/runs").exists()


def test_aggregation_matches_metrics_written_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    for c in configs("table1"):
        for t in range(3):
            p = run_params(c, "smoke", t)
            if c["M"] == 20 and c["N"] == 20 and t == 2: continue           # one trial missing: n_runs 2
            d = tmp_path/"runs"/p["name"]; d.mkdir(parents=True)
            r1, ap = rng.random(), rng.random()
            want.setdefault((c["M"], c["N"]), []).append((100 * r1, 100 * ap))
            (d/"params.json").write_text(json.dumps(p)); (d/"metrics.json").write_text(json.dumps(dict(rank1=r1, mAP=ap)))
    t = table(collect(tmp_path), "table1", "smoke", 3)
    for _, row in t.iterrows():
        v = np.array(want[(row.M, row.N)])
        assert row.n_runs == len(v) and row.rank1_mean == pytest.approx(v[:, 0].mean()) and row.mAP_std == pytest.approx(v[:, 1].std(ddof=1))
    assert t.set_index(["M", "N"]).loc[(20, 20), "n_runs"] == 2
    tabs = write_tables(collect(tmp_path), ["table1"], "smoke", 3, tmp_path, figure=tmp_path/"fig.png")
    csv = pd.read_csv(tmp_path/"tables/table1.csv")
    assert list(csv.columns) == ["M", "N", "rank1_mean", "rank1_std", "mAP_mean", "mAP_std", "n_runs"]
    best = tabs["table1"].rank1_mean.idxmax()
    assert f"**{tabs['table1'].rank1_mean[best]:.1f} ± " in (tmp_path/"tables/table1.md").read_text()
    assert r"\textbf{" in (tmp_path/"tables/table1.tex").read_text() and (tmp_path/"fig.png").stat().st_size > 10_000


def test_killed_sweep_resumes_to_the_same_tables(tmp_path, root):
    nb = fake_notebook(tmp_path/"fake.ipynb")
    code = (f"from stmn.executors import sweep; sweep('table3', 'smoke', 1, {str(tmp_path/'{out}')!r}, notebook={str(nb)!r}, workers=1)")
    whole = subprocess.run([sys.executable, "-c", code.replace("{out}", "whole")], cwd=root, timeout=300)
    assert whole.returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", code.replace("{out}", "cut")], cwd=root, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path/"cut/runs").glob("*/metrics.json")) and time.time() < deadline: time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()                      # the sweep and its kernels die mid-way
    finished = len(list((tmp_path/"cut/runs").glob("*/metrics.json")))
    assert 1 <= finished < 4
    assert subprocess.run([sys.executable, "-c", code.replace("{out}", "cut")], cwd=root, timeout=300).returncode == 0
    assert (tmp_path/"cut/tables/table3.csv").read_text() == (tmp_path/"whole/tables/table3.csv").read_text()


def test_submitit_local_executor_runs_two_runs(tmp_path):
    pytest.importorskip("submitit")
    nb = fake_notebook(tmp_path/"fake.ipynb")
    runs = [r for r in plan("table3", "smoke", 1)][:2]
    from stmn.executors import run_slurm
    assert run_slurm(runs, tmp_path/"out", nb, cluster="local", slurm=dict(timeout_min=10)) == ["done", "done"]
    assert all(status(tmp_path/"out/runs"/r["name"]) == "done" for r in runs)


def test_smoke_preset_of_one_grid_trains_for_real(tmp_path, root, data_home):
    tabs = sweep("table3", "smoke", 1, tmp_path/"sweep", workers=2, cwd=root, notebook=root/"nbs/train.ipynb")
    t = tabs["table3"]
    assert list(t.L) == [4, 6, 8, 10] and list(t.n_runs) == [1, 1, 1, 1] and t.rank1_mean.between(0, 100).all()
    for r in plan("table3", "smoke", 1):
        m = json.loads((tmp_path/"sweep/runs"/r["name"]/"metrics.json").read_text())
        assert m["split"] == "supplement half 0, trial 0" and m["params"]["L"] == r["L"]


def test_grid_rows_keep_their_labels_when_reordered_and_defaults_are_the_models(monkeypatch):
    import stmn.sweep
    from stmn.model import STMNConfig
    before = {c["row"]: c for c in configs("ablation")}
    assert not before["+ spatial memory"]["temporal_memory"] and before["+ spatial memory"]["spatial_memory"]
    monkeypatch.setitem(stmn.sweep.GRIDS, "ablation", stmn.sweep.GRIDS["ablation"][::-1])
    assert {c["row"]: c for c in configs("ablation")} == before                   # each row's label travels with its change
    model_defaults = STMNConfig(num_classes=1)
    assert {k: getattr(model_defaults, k) for k in stmn.sweep.CONFIG_KEYS} == {k: stmn.sweep.PAPER_DEFAULTS[k] for k in stmn.sweep.CONFIG_KEYS}
