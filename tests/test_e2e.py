"""End to end: synthetic data → training → evaluation, through the library and through papermill."""
import json
from pathlib import Path
import numpy as np
import papermill as pm
import pytest
import scipy.io
import torch
from stmn.base import DatasetLayoutError
from stmn.data import load_dataset
from stmn.mars import read_mars
from stmn.evaluation import evaluate_model
from stmn.learner import Learner
from stmn.recipes import build_model, resolve_params, validate_params
from stmn.synth import SynthConfig, make_synthetic_mars

TINY = dict(epochs=1, P=4, K=2, L=4, M=3, N=2, height=32, width=16, test_sampling="rrs", device="cpu", backbone="resnet10")


def test_library_end_to_end(tmp_path):
    root = make_synthetic_mars(tmp_path/"synth", SynthConfig(n_train_ids=6, n_test_ids=4, n_distractor_tracklets=2, n_junk_tracklets=2))
    ds = read_mars(root)
    p = resolve_params(dict(dataset="synth", model="stmn", alpha=.3, seed=0, **{**TINY, "epochs": 3, "P": 3}))
    validate_params(p, 6)
    learner = Learner(build_model(p, 6), ds.train, p, tmp_path/"run")
    hist = learner.fit(p["epochs"], progress=False)
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    assert {"ce_s", "ce_t", "tri_s", "tri_t", "spread_s", "spread_t"} <= set(hist[0])
    assert (tmp_path/"run/checkpoint.pt").is_file()
    r = evaluate_model(learner.model, ds, p["L"], p["height"], p["width"], "all")
    assert r["n_valid"] == len(ds.query) and 0 <= r["mAP"] <= 1 and r["rank1"] <= r["rank5"]


def run_train(root, out_dir, **params):
    out = out_dir.parent/f"{out_dir.name}.ipynb"
    pm.execute_notebook(str(root/"nbs/train.ipynb"), str(out), parameters=dict(TINY, out_dir=str(out_dir), **params),
                        cwd=str(root), progress_bar=False)
    return json.loads((out_dir/"metrics.json").read_text())


@pytest.mark.slow
def test_train_notebook_runs_and_evaluates(root, tmp_path, data_home):
    straight = run_train(root, tmp_path/"straight", epochs=2)
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "params", "seed", "environment", "wall_seconds", "protocol", "sampling"):
        assert key in straight, key
    assert straight["params"]["M"] == 3 and straight["environment"]["torch"] == torch.__version__
    assert straight["protocol"] == "paper" and straight["sampling"] == "rrs" and straight["n_query"] > 0
    assert (tmp_path/"straight/checkpoint.pt").is_file() and (tmp_path/"straight/training_curve.png").stat().st_size > 1000
    # resume="auto" continuing a run stopped by a signal, bit for bit, is tests/test_slurm.py's (the notebook, through
    # SLURM) and tests/test_faults.py's (the learner, killed at several points)
    # the same command again, scored another way: nothing trained, and the notebook and metrics.json say so
    again = run_train(root, tmp_path/"straight", epochs=2, ap="interpolated")
    assert again["resumed"] == dict(checkpoint=str(tmp_path/"straight/checkpoint.pt"), epoch=2, step=0)
    assert again["history"] == straight["history"] and again["ap"] == "interpolated"
    assert "the run was already trained, so this re-evaluates the trained model" in (tmp_path/"straight.ipynb").read_text()
    # the same folder with another dataset of the same shape (a copy with one frame's bytes replaced): refused, each
    # difference listed
    import shutil
    from stmn.data import default_data_root
    shutil.copytree(default_data_root("synth"), tmp_path/"other")
    first, second = (t.frames[0] for t in read_mars(tmp_path/"other").train[:2])
    Path(first).write_bytes(Path(second).read_bytes())
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_train(root, tmp_path/"straight", epochs=2, data_root=str(tmp_path/"other"))
    assert "data_root: '' in the checkpoint" in str(e.value) and "data_fingerprint:" in str(e.value)
    assert json.loads((tmp_path/"straight/metrics.json").read_text())["ap"] == "interpolated"      # its results untouched
    # the evaluate notebook on that checkpoint reproduces the training run's number and scores every variant
    pm.execute_notebook(str(root/"nbs/evaluate.ipynb"), str(tmp_path/"ev.ipynb"), cwd=str(root), progress_bar=False,
                        parameters=dict(checkpoint=str(tmp_path/"straight/checkpoint.pt"), sampling="rrs", out_dir=str(tmp_path/"ev"), k_ranklist=5))
    ev = json.loads((tmp_path/"ev/metrics.json").read_text())
    assert ev["mAP"] == pytest.approx(straight["mAP"], abs=1e-5) and ev["n_gallery"] == straight["n_gallery"]
    assert len(ev["table"]) == 2 * 3 * 2 * 2 and {r["protocol"] for r in ev["table"]} == {"paper", "matlab", "torchreid"}
    assert (tmp_path/"ev/ranklist.png").stat().st_size > 5000 and (tmp_path/"ev/table.csv").read_text().count("\n") == 25


@pytest.mark.slow
def test_train_notebook_on_a_supplement_validation_half(root, tmp_path, data_home):
    m = run_train(root, tmp_path/"val", epochs=1, split=1, trial=2)
    ds = load_dataset("synth", split=1, trial=2)
    assert m["split"] == "supplement half 1, trial 2" == ds.split and m["dataset"] == "synth-val"
    assert m["n_query"] == len(ds.query) and m["n_gallery"] == len(ds.gallery) == len(load_dataset("synth").train) - len(ds.train)
    assert m["params"]["split"] == 1 and m["params"]["trial"] == 2


def test_bad_parameters_fail_before_training(root, tmp_path, data_home):
    "The notebook stops at its parameter check, before any checkpoint (one papermill run; the other cases in-process)."
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_train(root, tmp_path/"bad", M=0)
    assert "M=0" in str(e.value) and not (tmp_path/"bad/checkpoint.pt").exists()


@pytest.mark.parametrize("bad, message", [(dict(N=0), "N=0"), (dict(alpha=-0.5), "alpha=-0.5"), (dict(L=0), "L=0"),
                                          (dict(P=500), "P=500"), (dict(dataset="market"), "dataset="), (dict(split=5), "split=5"),
                                          (dict(protocol="official"), "protocol='official'"), (dict(model="ste_nvan", L=6), "multiple of 4"),
                                          (dict(recipe="bot"), "recipe=")])
def test_bad_parameters_are_named(bad, message):
    "The train notebook's first cells: resolve_params, then validate_params with the training identity count."
    params = {**dict(dataset="synth", model="stmn", alpha=.3, seed=0), **TINY, **bad}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_params(resolve_params(params), 48)


def test_missing_or_malformed_mars_folder(tmp_path):
    with pytest.raises(DatasetLayoutError, match="expected the MARS layout"):
        load_dataset("mars", tmp_path/"nowhere")
    root = make_synthetic_mars(tmp_path/"m", SynthConfig(n_train_ids=3, n_test_ids=3, n_distractor_tracklets=1, n_junk_tracklets=1))
    scipy.io.savemat(root/"info/tracks_train_info.mat", {"wrong_name": np.zeros((2, 4))})
    with pytest.raises(DatasetLayoutError, match="no variable 'track_train_info'") as e:
        read_mars(root)
    assert "tracks_train_info.mat" in str(e.value) and "bbox_train/<pid>" in str(e.value)
    (root/"info/tracks_train_info.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetLayoutError, match="cannot read"):
        read_mars(root)


def test_names_that_disagree_with_info_rows_are_reported(tmp_path):
    root = make_synthetic_mars(tmp_path/"m", SynthConfig(n_train_ids=3, n_test_ids=3, n_distractor_tracklets=1, n_junk_tracklets=1))
    info = scipy.io.loadmat(root/"info/tracks_train_info.mat")["track_train_info"]
    info[0, 2] += 100                                                   # wrong person id in row 1
    scipy.io.savemat(root/"info/tracks_train_info.mat", {"track_train_info": info})
    with pytest.raises(DatasetLayoutError, match="row 1 .*names disagree"):
        read_mars(root)


def test_stmn_loss_decreases_on_repeated_batch(tmp_path):
    "A few steps on one fixed batch must lower the loss: the gradients reach every trained part."
    root = make_synthetic_mars(tmp_path/"s", SynthConfig(n_train_ids=4, n_test_ids=2, n_distractor_tracklets=1, n_junk_tracklets=1))
    p = resolve_params(dict(dataset="synth", model="stmn", alpha=.3, seed=0, **TINY))
    learner = Learner(build_model(p, 4), read_mars(root).train, p, tmp_path/"run")
    clips, labels, _ = next(iter(torch.utils.data.DataLoader(learner.data, batch_sampler=learner.sampler)))
    from stmn.losses import stmn_loss
    losses = []
    for _ in range(8):
        loss, _ = stmn_loss(learner.model(clips), labels, .3)
        learner.opt.zero_grad(); loss.backward(); learner.opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert learner.model.spatial_memory.keys.grad is not None and learner.model.temporal_memory.keys.grad is not None
