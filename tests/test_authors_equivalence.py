"""`stmn` is the authors' STMN: their weights, loaded by `load_authors_state_dict`, give their outputs (fp32, CPU).

The fixture was written by tests/make_authors_fixture.py from the authors' first release (commit in its metadata);
this test needs none of their code: it refills the same weights from the names and shapes by the shared seed rule.
"""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from stmn.model import load_authors_state_dict
from helpers import seeded_tensor
from stmn.losses import stmn_loss

FIXTURE = Path(__file__).parent/"fixtures"/"authors_stmn.npz"
RTOL = 1e-4


@pytest.fixture(scope="module")
def case():
    z = np.load(FIXTURE)
    meta = json.loads(str(z["meta"]))
    sd = {f"module.{n}": seeded_tensor(n, s) for n, s in zip(meta["names"], meta["shapes"])}   # as DataParallel saves it
    torch.manual_seed(0)
    model = load_authors_state_dict(sd)
    x = torch.from_numpy(np.random.default_rng(2021).standard_normal(meta["input"]["shape"]).astype(np.float32))
    return model, x, meta, {k: torch.from_numpy(z[k]) for k in z.files if k != "meta"}


def close(ours, theirs, what):
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"{what}: relative error {err:.1e}")
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:g}"
    return err


def test_config_read_from_the_state_dict(case):
    model, _, meta, _ = case
    c = model.cfg
    assert (c.M, c.N, c.L, c.num_classes, c.backbone) == (meta["M"], meta["N"], meta["L"], meta["classes"], "resnet50")
    assert c.stem_relu is False and c.bnneck_train_weight is True and not model.training


def test_eval_outputs_match(case):
    model, x, meta, want = case
    B, L = x.shape[:2]
    with torch.no_grad():
        feats = model.forward_features(x)
        descriptor = model(x)
    close(descriptor, want["descriptor"], "descriptor BN_t(f^st)")
    close(feats["f_o"].reshape(B * L, -1), want["f_o"], "frame features f^o")
    close(feats["f_s"].reshape(B * L, -1), want["f_s"], "frame features f^s")
    close(feats["p_s"], want["p_s"], "spatial addressing p_s")
    close(feats["p_t"], want["p_t"], "temporal addressing p_t")
    close(feats["attn"], want["attn"], "temporal attention a")


def test_training_loss_matches(case):
    model, x, meta, want = case
    model.train()
    try:
        _, parts = stmn_loss(model(x), torch.tensor(meta["labels"]), alpha=.3)
    finally:
        model.eval()
    close(parts["ce_s"] + parts["ce_t"], want["loss_track_id"], "cross-entropy terms")
    close(parts["tri_s"] + parts["tri_t"], want["loss_trip"], "triplet terms")
    close(parts["spread_s"], want["loss_spread_s"], "spatial spread loss")
    close(parts["spread_t"], want["loss_spread_t"], "temporal spread loss")


def test_a_wrong_flag_is_detected(case):
    "The comparison has teeth: the torchvision stem (with ReLU) does not reproduce their outputs."
    _, x, meta, want = case
    sd = {n: seeded_tensor(n, s) for n, s in zip(meta["names"], meta["shapes"])}
    with torch.no_grad(): d = load_authors_state_dict(sd, stem_relu=True)(x)
    assert ((d - want["descriptor"]).norm() / want["descriptor"].norm()).item() > 10 * RTOL


def test_foreign_state_dicts_are_named():
    with pytest.raises(KeyError, match="head.weight"): load_authors_state_dict({"head.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match="missing"): load_authors_state_dict({"bn_s.weight": torch.zeros(3)})
