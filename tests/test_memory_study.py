"""The memory study end to end at its smoke preset: the trunk pretrained, every run through the sweep executors, the
plan's rules applied, the results file and figure written; a rerun skips what is done."""
import hashlib
import json
import subprocess
import sys
import pandas as pd
import pytest

pytestmark = pytest.mark.slow                     # `make test-fast` leaves this module out


def run_study(root, tmp_path, out):
    cmd = [sys.executable, "-m", "papermill", str(root/"nbs/memory_study.ipynb"), str(tmp_path/"study.ipynb"), "-p", "preset", "smoke",
           "-p", "out_dir", str(out), "-r", "results", "", "--no-progress-bar"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_memory_study_smoke_preset_applies_the_plan(root, data_home, tmp_path):
    from stmn.memory_study import STUDY_PRESETS, verdicts, overall
    from stmn.pretrain import trunk_path
    out = tmp_path/"study"
    before = sorted(p.name for p in (root/"bench/memory_study").iterdir())
    run_study(root, tmp_path, out)
    res = json.loads((out/"results.json").read_text())
    runs = pd.DataFrame(res["runs"])
    assert len(runs) == 4 and set(runs.arm) == {"stmn-pretrained-default", "baseline-pretrained-default"}
    assert sorted(set(runs.seed)) == [0, 1]
    assert {v["hypothesis"] for v in res["verdicts"]} >= {"H1 spatial on", "H1 temporal on", "H2 helps", "H5 spatial targets distractors",
                                                          "H5 temporal favours clean frames"}   # H3, H4 need two doses, two trunks
    assert overall(verdicts(runs, L=STUDY_PRESETS["smoke"].recipe["L"])) == res["overall"]     # the verdicts follow from the rows
    assert (runs[runs.model == "baseline"].removed_share == 0).all()                             # no memory: nothing removed
    assert (out/"memory_study.png").stat().st_size > 10_000
    # the pretrained arms started from the trunk the study trained: its hash is in each run's record
    trunk = trunk_path(STUDY_PRESETS["smoke"].pretrain)
    sha = hashlib.sha256(trunk.read_bytes()).hexdigest()[:16]                 # run_identity keeps 16 hex digits
    for name in ("stmn-pretrained-default-s0", "baseline-pretrained-default-s1"):
        assert json.loads((out/"runs"/name/"metrics.json").read_text())["params"]["pretrained_sha256"] == sha
    text = json.dumps(res)
    assert str(tmp_path) not in text and str(data_home) not in text                           # no paths of this machine
    assert sorted(p.name for p in (root/"bench/memory_study").iterdir()) == before             # `-r results ''`: nothing committed touched
    # a rerun skips every finished run: no metrics.json is written again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    run_study(root, tmp_path, out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")} == stamps


def test_committed_results_follow_the_plan_and_the_readme_says_them(root):
    "bench/memory_study/results.json: its verdicts are what the plan's rules give on its own rows, and the README states its outcome."
    from stmn.memory_study import verdicts, overall
    res = json.loads((root/"bench/memory_study/results.json").read_text())
    assert res["preset"] == "study" and res["plan"] == "bench/memory_study/PLAN.md"
    runs = pd.DataFrame(res["runs"])
    assert len(runs) == len(res["design"]["seeds"]) * (len(res["design"]["doses"]) * len(res["design"]["inits"]) * 2
                                                      + len(res["design"]["departure_doses"]))
    again = verdicts(runs, L=res["design"]["recipe"]["L"])
    key = lambda v: (v["hypothesis"], v["arm"], v["statistic"])
    assert {key(v): v["verdict"] for v in again} == {key(v): v["verdict"] for v in res["verdicts"]}
    assert overall(again) == res["overall"]
    readme = (root/"README.md").read_text()
    assert "## Does the memory matter here?" in readme and f"**{res['overall']}**" in readme
