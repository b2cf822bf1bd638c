"""The figures notebook end to end on tiny checkpoints: every figure, caption and measured number is written."""
import pytest
import json
import papermill as pm
from stmn.data import load_dataset
from stmn.learner import Learner
from stmn.recipes import build_model, resolve_params

pytestmark = pytest.mark.slow                     # `make test-fast` leaves this module out

TINY = dict(dataset="synth", backbone="resnet10", epochs=1, P=4, K=2, M=10, N=5, alpha=.3, height=32, width=16, seed=0, workers=0)


def train(tmp_path, name, **params):
    p = resolve_params(dict(TINY, **params))
    ds = load_dataset("synth")
    learner = Learner(build_model(p, len({t.pid for t in ds.train})), ds.train, p, tmp_path/name)
    learner.fit(p["epochs"], progress=False)
    return learner.checkpoint_path


def test_figures_notebook_on_tiny_checkpoints(root, tmp_path, data_home):
    stmn = train(tmp_path, "stmn", model="stmn", L=6)
    nvan = train(tmp_path, "nvan", model="ste_nvan", L=8)
    out = tmp_path/"figs"
    pm.execute_notebook(str(root/"nbs/figures.ipynb"), str(tmp_path/"figures.ipynb"), cwd=str(root), progress_bar=False,
                        parameters=dict(checkpoint=str(stmn), comparator_checkpoint=str(nvan), memory_sizes=[10], queries=2,
                                        query_rule="disagree", sampling="rrs", out_dir=str(out), runs_dir=str(tmp_path/"runs")))
    names = ["fig1_spatial_items", "fig1_item_usage", "fig2_ranklists_stenvan_vs_stmn", "fig3_ranklists_fo_vs_fs", "fig4_temporal_attention"]
    for n in names:
        assert (out/f"{n}.png").stat().st_size > 2000 and (out/f"{n}.pdf").stat().st_size > 1000, n
    captions = (out/"FIGURES.md").read_text()
    for n in names:                                    # each caption: checkpoint, dataset, protocol and sampling
        line = next(c for c in captions.split("\n\n") if c.startswith(f"**{n}**"))
        assert all(w in line for w in ("checkpoint", "dataset synth", "protocol paper", "sampling")), line
    assert "largest gap in first-match rank" in captions and "sampling" in captions
    nums = json.loads((out/"figures_numbers.json").read_text())
    assert len(nums["queries"]) == 2 and nums["n_query"] > 0 and not (tmp_path/"runs").exists()   # nothing trained
    a = nums["attention_on_clean"]["mixed"]
    assert a["clips"] > 0 and 0 < a["attention_on_clean"] < 1 and 0 < a["clean_frames"] < 1
    d = nums["distractor_addressing"]["10"]
    assert len(d["per_item"]) == 10 and 0 < d["area_share"] < 1 and all(0 <= x <= 1 for x in d["per_item"])
    assert abs(sum(d["usage"]) - 1) < 1e-6
    assert set(nums["fo_vs_fs"]) == {"f_o", "f_s"} and all(0 <= v["mAP"] <= 1 for v in nums["fo_vs_fs"].values())
