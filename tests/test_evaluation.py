"""Evaluation against a literal, pure-Python transcription of the definitions (the MARS kit's compute_AP.m loop)."""
import numpy as np
import pytest
import torch
from stmn.evaluation import evaluate, evaluate_reference, evaluate_torch


def random_case(rng: np.random.Generator, ties: bool):
    "A random evaluation case `(distmat, q_pids, g_pids, q_camids, g_camids)` with junk, distractors and unmatched queries."
    Q, G = int(rng.integers(1, 9)), int(rng.integers(1, 40))
    D = rng.integers(0, 3, (Q, G)).astype(np.float32) if ties else rng.random((Q, G), dtype=np.float32)
    if rng.random() < .1: gp = np.full(G, -1)                                   # an all-junk gallery
    else: gp = rng.integers(-1, 5, G)
    return D, rng.integers(0, 6, Q), gp, rng.integers(1, 4, Q), rng.integers(1, 4, G)


def literal(dist, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    "Per query: walk the stable ranking item by item, skip junk, accumulate plain and trapezoidal AP, CMC and INP."
    out = []
    for q in range(len(q_pids)):
        G = len(g_pids)
        order = sorted(range(G), key=lambda i: (float(dist[q][i]), i))
        junk = {i for i in range(G) if g_pids[i] == -1 or (g_pids[i] == q_pids[q] and g_camids[i] == q_camids[q])}
        good = {i for i in range(G) if g_pids[i] == q_pids[q] and i not in junk}
        if not good:
            out.append(None); continue
        hits, plain, trapezoid, old_precision, first, last, r = 0, 0., 0., 1., None, None, 0
        for i in order:
            if i in junk: continue
            r += 1
            if i in good:
                hits += 1
                plain += hits / r / len(good)
                trapezoid += (old_precision + hits / r) / 2 / len(good)
                first = first or r
                last = r
            old_precision = hits / r
        out.append(dict(plain=plain, interpolated=trapezoid, first=first, inp=len(good) / last))
    return out


def check(case, chunk):
    D, qp, gp, qc, gc = case
    want = literal(D, qp, gp, qc, gc)
    valid = [w for w in want if w is not None]
    for ap in ("plain", "interpolated"):
        for got in (evaluate(D, qp, gp, qc, gc, ap=ap, chunk=chunk), evaluate_torch(torch.from_numpy(D), qp, gp, qc, gc, ap=ap, chunk=chunk),
                    evaluate_reference(D, qp, gp, qc, gc, ap=ap)):
            assert got["n_valid"] == len(valid) and got["n_skipped"] == len(want) - len(valid)
            for a, w in zip(got["ap"], want):
                assert (np.isnan(a) if w is None else a == pytest.approx(w[ap])), (a, w)
            if valid:
                assert got["mAP"] == pytest.approx(np.mean([w[ap] for w in valid]))
                assert got["mINP"] == pytest.approx(np.mean([w["inp"] for w in valid]))
                for k in (1, 2, 5):
                    assert got["cmc"][k - 1] == pytest.approx(np.mean([w["first"] <= k for w in valid]))


@pytest.mark.parametrize("ties", [False, True])
def test_random_cases_agree_with_the_literal_definition(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(300):
        check(random_case(rng, ties), chunk=int(rng.integers(1, 5)))


def test_edge_cases():
    # all-junk gallery, a query whose only same-id items share its camera, and a junk-id query
    check((np.zeros((3, 4), np.float32), np.array([1, 2, -1]), np.array([-1, 2, -1, -1]), np.array([1, 1, 1]), np.array([2, 1, 2, 2])), 2)
    # negative zero and positive zero are the same distance: gallery order decides
    D = np.array([[0.0, -0.0, 0.0]], np.float32)
    r = evaluate(D, [1], [2, 1, 1], [1], [2, 2, 2])
    assert r["cmc"][0] == 0 and r["ap"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_mars_sized_case_matches_the_reference():
    "A 300 × 11,310 slice with MARS-like ids and cameras (the full size is the benchmark's): same numbers."
    rng = np.random.default_rng(0)
    gp = rng.integers(1, 630, 11310); gp[:3248] = 0; gp[3248:4118] = -1
    gc = rng.integers(1, 7, 11310)
    qi = rng.choice(np.arange(4118, 11310), 300, replace=False)
    D = rng.random((300, 11310), dtype=np.float32)
    for ap in ("plain", "interpolated"):
        a, b = evaluate(D, gp[qi], gp, gc[qi], gc, ap=ap), evaluate_reference(D, gp[qi], gp, gc[qi], gc, ap=ap)
        assert np.allclose(a["cmc"], b["cmc"]) and np.allclose(a["ap"], b["ap"], equal_nan=True) and a["mINP"] == pytest.approx(b["mINP"])


def test_chunk_defaults_apply_where_documented(monkeypatch):
    "`evaluate` ranks CPU_CHUNK queries a block unless told otherwise; `evaluate_torch` (and a CUDA tensor through `evaluate`) TORCH_CHUNK."
    import inspect
    import stmn.evaluation as ev
    seen, ranks = [], ev._match_ranks
    monkeypatch.setattr(ev, "_match_ranks", lambda *a, **k: seen.append(a[5]) or ranks(*a, **k))
    D, *ids = random_case(np.random.default_rng(0), ties=True)
    assert np.array_equal(ev.evaluate(D, *ids)["cmc"], ev.evaluate(D, *ids, chunk=1)["cmc"])        # exact whatever the block
    assert seen == [ev.CPU_CHUNK, 1]
    assert inspect.signature(ev.evaluate_torch).parameters["chunk"].default == ev.TORCH_CHUNK
    if torch.cuda.is_available():
        blocks, torch_path = [], ev.evaluate_torch
        monkeypatch.setattr(ev, "evaluate_torch", lambda *a: blocks.append(a[-1]) or torch_path(*a))
        got = ev.evaluate(torch.from_numpy(D).cuda(), *ids)
        assert blocks == [ev.TORCH_CHUNK] and np.array_equal(got["cmc"], ev.evaluate(D, *ids)["cmc"])
