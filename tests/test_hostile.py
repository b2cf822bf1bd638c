"""Hostile inputs: each ends in a correct result or a clear error naming what was wrong, and nothing is deleted or
changed that the project did not make."""
from __future__ import annotations
import subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict:
    "Every file under `folder` with its bytes: what a tool must leave as it found it."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["checkout", "parent", "user folder"])
def test_the_site_builder_refuses_a_folder_it_did_not_make(tmp_path, where):
    "`build.py --out .` in a checkout (or above it, or into a folder of the user's) refuses, exits non-zero, deletes nothing."
    clone = tmp_path / "clone"; (clone / ".git").mkdir(parents=True)
    (clone / ".git/HEAD").write_text("ref: refs/heads/main\n"); (clone / "notes.txt").write_text("untracked notes")
    (tmp_path / "mine").mkdir(); (tmp_path / "mine/thesis.tex").write_text("chapter 1")
    out = {"checkout": ".", "parent": "..", "user folder": str(tmp_path / "mine")}[where]
    before = tree(tmp_path)
    run = subprocess.run([sys.executable, str(ROOT / "nbs/_site/build.py"), "--out", out], cwd=clone, capture_output=True, text=True)
    assert run.returncode != 0 and "refusing to replace it (nothing was deleted)" in run.stderr, run.stdout + run.stderr
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["clone", "mine"]


def test_nan_or_empty_input_to_any_evaluation_path_is_an_error():
    "One check before every dispatch: NaN/inf distances or descriptors, an empty query set, a 1-D matrix."
    from stmn.evaluation import cosine_distance, evaluate, evaluate_reference, evaluate_torch
    from stmn.reranking import k_reciprocal_distance
    ids = ([1, 2], [1, 2, 2], [1, 1], [2, 2, 1])
    for D in (np.full((2, 3), np.nan), np.array([[0, np.inf, 1], [1, 0, 1]])):
        for path in (evaluate, evaluate_reference, lambda D, *a: evaluate_torch(torch.from_numpy(D), *a),
                     lambda D, *a: evaluate(torch.from_numpy(D), *a)):
            with pytest.raises(ValueError, match="distmat .* NaN or infinite"): path(D, *ids)
    with pytest.raises(ValueError, match="is empty"): evaluate(np.zeros((0, 3)), [], ids[1], [], ids[3])
    with pytest.raises(ValueError, match="2-D"): evaluate(np.zeros(3), [1], ids[1], [1], ids[3])
    q, g = torch.randn(2, 8), torch.randn(3, 8); g[1, 2] = float("nan")
    for fn in (cosine_distance, k_reciprocal_distance):
        with pytest.raises(ValueError, match="gallery descriptors .* NaN"): fn(q, g)
    with pytest.raises(ValueError, match=r"gallery descriptors: expected shape \(3, 8\), got \(3, 4\)"):
        cosine_distance(q, torch.randn(3, 4))


def tiny_run(tmp_path, name, seed):
    "Configuration, identity and training set of a tiny run on the synthetic dataset made with `seed` at `tmp_path/name`."
    from stmn.checkpoints import run_identity
    from stmn.mars import read_mars
    from stmn.recipes import RunConfig
    from stmn.synth import SynthConfig, make_synthetic_mars
    root = make_synthetic_mars(tmp_path / name, SynthConfig(seed=seed, n_train_ids=4, n_test_ids=2, n_distractor_tracklets=1,
                                                            n_junk_tracklets=1, max_frames=8))
    ds = read_mars(root)
    cfg = RunConfig(dataset="synth", model="stmn", backbone="resnet10", M=3, N=2, alpha=.3, seed=0, P=2, K=2, L=3,
                    epochs=1, lr_step=1, workers=0, height=32, width=16, data_root=str(root), synth_seed=seed)
    return cfg, run_identity(cfg, ds), ds


def test_a_run_folder_reused_with_other_data_is_refused_listing_the_difference(tmp_path):
    "Trained on one dataset, resumed with another of the same shape: an error listing data_root and the fingerprint."
    from stmn.learner import Learner
    from stmn.recipes import build_model
    p, identity, ds = tiny_run(tmp_path, "a", 0)
    Learner(build_model(p, 4), ds.train, p, tmp_path / "run", identity=identity).fit(1, progress=False)
    again = Learner(build_model(p, 4), ds.train, p, tmp_path / "run", identity=identity)
    again.fit(1, progress=False)                                                                    # the same run: fine
    assert again.resumed == dict(checkpoint=str(tmp_path / "run/checkpoint.pt"), epoch=1, step=0)
    q, other_identity, other = tiny_run(tmp_path, "b", 1)
    with pytest.raises(ValueError) as e:
        Learner(build_model(q, 4), other.train, q, tmp_path / "run", identity=other_identity).fit(1, progress=False)
    message = str(e.value)
    assert "data_root:" in message and "data_fingerprint:" in message and "synth_seed: 0 in the checkpoint, 1 now" in message
    assert "use another out_dir, or resume='' to train afresh here" in message


def test_a_checkpoint_of_another_identity_count_is_named_not_a_size_mismatch_traceback(tmp_path):
    from stmn.learner import Learner
    from stmn.recipes import build_model
    p, identity, ds = tiny_run(tmp_path, "a", 0)
    Learner(build_model(p, 4), ds.train, p, tmp_path / "run", identity=identity).fit(1, progress=False)
    with pytest.raises(ValueError, match="its weights do not fit this run's model .*another run"):
        Learner(build_model(p, 5), ds.train, p, tmp_path / "run", identity=identity).fit(1, progress=False)


def test_a_list_naming_one_tracklet_twice_is_refused_whatever_the_reader(tmp_path):
    "LS-VID's sequence list with a line repeated: the training set would count those frames twice; `load_dataset` refuses."
    from stmn.base import DatasetLayoutError
    from stmn.data import load_dataset
    from stmn.miniature import write_mini_lsvid
    root = tmp_path / "lsvid"; write_mini_lsvid(root)
    listing = root / "list_sequence/list_seq_train.txt"; lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"frame\(s\) of lsvid .* belong to two tracklets") as e:
        load_dataset("lsvid", root)
    assert "train: frame " in str(e.value) and "(ids 1000 and 1000)" in str(e.value)
