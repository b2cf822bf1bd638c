"""Property-based hostile inputs (Hypothesis): random damage to a miniature MARS, random evaluation cases, random
training parameters. Each example ends in a correct result or the project's own error naming what was wrong — never
a raw traceback, a hang, a silent wrong number, or a changed file outside the run."""
from __future__ import annotations
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings, strategies as st

from stmn.base import BadImageError, DatasetLayoutError
from stmn.evaluation import evaluate, evaluate_reference
from stmn.mars import read_mars
from stmn.miniature import write_mini_mars
from stmn.recipes import RunConfig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DISK = settings(FAST, max_examples=15)                      # each example copies and reads a dataset


# ---- evaluation: random shapes, ties, NaN/inf, empty sets, junk-only galleries --------------------------------------
@st.composite
def evaluation_cases(draw):
    Q, G = draw(st.integers(0, 6)), draw(st.integers(0, 12))
    D = np.array(draw(st.lists(st.sampled_from([0., .5, 1., 2., np.nan, np.inf, -0.]), min_size=Q * G, max_size=Q * G)),
                 dtype=np.float32).reshape(Q, G)
    ids = lambda n, lo: np.array(draw(st.lists(st.integers(lo, 3), min_size=n, max_size=n)), dtype=np.int64)
    return D, ids(Q, 0), ids(G, -1), ids(Q, 1), ids(G, 1)


@FAST
@given(evaluation_cases())
def test_evaluation_is_right_or_refuses_by_name(case):
    D, qp, gp, qc, gc = case
    if D.size == 0 or not np.isfinite(D).all():
        with pytest.raises(ValueError, match="distmat"): evaluate(D, qp, gp, qc, gc)
        return
    got, want = evaluate(D, qp, gp, qc, gc), evaluate_reference(D, qp, gp, qc, gc)
    np.testing.assert_allclose(got["cmc"], want["cmc"]); assert got["n_valid"] + got["n_skipped"] == len(qp)
    np.testing.assert_allclose(np.nan_to_num(got["ap"], nan=-1), np.nan_to_num(want["ap"], nan=-1))


# ---- readers: random damage to a miniature MARS -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini") / "mars"; write_mini_mars(root); return root


DAMAGES = ("delete", "truncate", "duplicate_name", "rename", "retype_info", "fraction_info", "swap_rows", "empty_file")


def damage(root: Path, kind: str, pick: int):
    "Apply one kind of damage to the `pick`-th eligible file or row of the MARS copy at `root`; what it did."
    frames = sorted(root.rglob("*.jpg")); frame = frames[pick % len(frames)]
    info = root / "info/tracks_train_info.mat"
    rows = scipy.io.loadmat(info)["track_train_info"]
    if kind in ("fraction_info", "swap_rows") and rows.dtype.kind not in "iuf": return     # already re-typed: no rows left
    if kind == "delete": frame.unlink()
    elif kind == "truncate": frame.write_bytes(frame.read_bytes()[: len(frame.read_bytes()) // 3])
    elif kind == "empty_file": frame.write_bytes(b"")
    elif kind == "rename": frame.rename(frame.with_name("X" + frame.name))
    elif kind == "duplicate_name":
        names = (root / "info/train_name.txt").read_text().split()
        names[pick % len(names)] = names[(pick + 1) % len(names)]
        (root / "info/train_name.txt").write_text("\n".join(names) + "\n")
    elif kind == "retype_info": scipy.io.savemat(info, {"track_train_info": np.array([["a"] * 4] * len(rows))})
    elif kind == "fraction_info":
        rows = rows.astype(float); rows[pick % len(rows), 2] += .5; scipy.io.savemat(info, {"track_train_info": rows})
    elif kind == "swap_rows":
        i = pick % len(rows); rows[[i, (i + 1) % len(rows)], :2] = rows[[(i + 1) % len(rows), i], :2]
        scipy.io.savemat(info, {"track_train_info": rows})


@DISK
@given(kinds=st.lists(st.sampled_from(DAMAGES), min_size=1, max_size=3), pick=st.integers(0, 200))
def test_a_damaged_dataset_reads_right_or_is_named(pristine, tmp_path_factory, kinds, pick):
    root = tmp_path_factory.mktemp("damaged") / "mars"; shutil.copytree(pristine, root)
    for k in kinds: damage(root, k, pick)
    outside = {p: p.stat().st_mtime_ns for p in pristine.rglob("*")}
    try:
        ds = read_mars(root, verify="decode") if "truncate" in kinds or "empty_file" in kinds else read_mars(root)
    except (DatasetLayoutError, BadImageError) as e:
        assert str(root) in str(e) or "info/" in str(e) or "_name.txt" in str(e), str(e)    # it names the file or row
    else:
        assert all(len(t) for t in ds.train + ds.query + ds.gallery)                            # a result that holds up
        frames = [f for t in ds.train for f in t.frames]; assert len(frames) == len(set(frames))   # no frame counted twice
    assert {p: p.stat().st_mtime_ns for p in pristine.rglob("*")} == outside                   # nothing else touched


# ---- training parameters: random types and ranges ----------------------------------------------------------------
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=6), st.just("stmn"), st.just("rrs"))
KEYS = ("M", "N", "L", "P", "K", "alpha", "lr", "epochs", "lr_step", "height", "width", "model", "test_sampling", "workers",
        "amp", "ckpt_every", "nproc", "split", "trial", "protocol", "verify", "bad_images", "weight_decay")


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_bad_parameters_are_named(change):
    p = dict(dataset="synth", model="stmn", alpha=.3, seed=0)
    try: RunConfig(**{**p, **change}).validate(n_train_ids=48)
    except ValueError as e:
        assert any(str(e).startswith(f"{k}=") for k in change) or "expected" in str(e), str(e)   # names the parameter
