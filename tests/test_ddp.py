"""DDP on the CPU: two gloo processes take the step one process takes on the same global batch; SyncBN refuses the CPU.

The whole torchrun path (launch, every rank's steps, metrics written once) is nbs/08c_distributed.ipynb's demonstration.
"""
import datetime, time
from dataclasses import replace
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from stmn.base import Tracklet
from stmn.learner import Learner
from stmn.mars import read_mars
from stmn.recipes import build_model
from stmn.synth import SynthConfig, make_synthetic_mars
from helpers import tiny

WORLD = 2
IDS = 4                            # training identities: P = 2 per rank × 2 ranks, every identity in the one global batch
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
ULPS = 4                           # see test_ddp_gradients_equal_one_process_on_the_same_halves
SPAWN_TIMEOUT_S = 300              # both ranks started, trained one step and wrote their result, or the test fails


def test_sync_bn_refuses_the_cpu(tmp_path):
    cfg = tiny(P=2, K=2, sync_bn=True)
    with pytest.raises(ValueError, match="sync_bn=True: SyncBatchNorm needs CUDA"):
        Learner(build_model(cfg, 2), [Tracklet(("x",), 1, 1), Tracklet(("y",), 2, 1)], cfg, tmp_path)


def clips_of(data, items):
    "The clips `[B, L, 3, H, W]` and labels `[B]` of sampler items `(tracklet index, seed)`, as the learner's loader collates them."
    got = [data[i] for i in items]
    return torch.stack([c for c, _, _ in got]), torch.tensor([y for _, y, _ in got])


def trained_params(model) -> list:
    return [(n, w) for n, w in model.named_parameters() if w.requires_grad]


def one_ddp_step(rank: int, world: int, root: str, cfg, store: str, out: str):
    "A rank: join the gloo group, build the learner (which wraps the model in DDP), take one `train_step` on its batch."
    torch.set_num_threads(1)                                           # the reference computes with one thread too
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S // 2))
    try:
        learner = Learner(build_model(cfg, IDS), read_mars(root).train, cfg, cfg.out_dir)
        items = learner.sampler.batches(0)[0]                          # this rank's P × K of the first global batch
        learner.train_step(*clips_of(learner.data, items))
        torch.save(dict(items=items, wrapped=type(learner.net).__name__,
                        grads={n: w.grad for n, w in trained_params(learner.model)},
                        weights={n: w.detach() for n, w in trained_params(learner.model)}), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, args, nprocs: int, timeout: float):
    "Run `fn(rank, *args)` in `nprocs` fresh processes; raise a child's error, or fail after `timeout` seconds (a hung collective)."
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes: p.kill()
            pytest.fail(f"{nprocs} DDP processes did not finish within {timeout} s")


def worst(got: dict, want: dict) -> tuple[float, str]:
    "The largest `max|got − want| / max|want|` over tensors, and which tensor: the difference in units of the tensor's scale."
    return max(((got[n] - want[n]).abs().max().item() / want[n].abs().max().clamp_min(1e-30).item(), n) for n in want)


@pytest.fixture(scope="module")
def ddp_and_one_process(tmp_path_factory):
    "Two gloo ranks' gradients and weights after one Learner step, and one process's on the same global batch."
    tmp = tmp_path_factory.mktemp("ddp")
    root = make_synthetic_mars(tmp/"synth", SynthConfig(n_train_ids=IDS, n_test_ids=2, n_distractor_tracklets=1,
                                                        n_junk_tracklets=1, max_frames=8))
    cfg = tiny(P=IDS // WORLD, K=2, out_dir=str(tmp/"ddp"))
    spawn(one_ddp_step, (WORLD, str(root), cfg, str(tmp/"store"), str(tmp)), WORLD, SPAWN_TIMEOUT_S)
    ranks = [torch.load(tmp/f"rank{r}.pt") for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = replace(cfg, P=cfg.P * WORLD, out_dir=str(tmp/"one"))   # the global batch of P × world identities in one process
        learner = Learner(build_model(one, IDS), read_mars(root).train, one, one.out_dir)
        items = learner.sampler.batches(0)[0]
        halves = [items[r * len(items) // WORLD:(r + 1) * len(items) // WORLD] for r in range(WORLD)]

        def grads(batch) -> dict:
            "Gradients of the learner's loss on `batch`, forward and backward alone (training-mode BatchNorm: its statistics)."
            clips, labels = clips_of(learner.data, batch)
            learner.opt.zero_grad(set_to_none=True)
            learner.loss(learner.model(clips), labels)[0].backward()
            return {n: w.grad.clone() for n, w in trained_params(learner.model)}
        per_half = [grads(h) for h in halves]
        mean = {n: (per_half[0][n] + per_half[1][n]) / WORLD for n in per_half[0]}
        whole = grads(items)                                            # the loss of all 8 clips at once
        for n, w in trained_params(learner.model): w.grad = mean[n].clone()
        learner.opt.step()                                              # the Adam step train_step takes, from the mean
        weights = {n: w.detach().clone() for n, w in trained_params(learner.model)}
    finally:
        torch.set_num_threads(threads)
    return dict(ranks=ranks, items=items, halves=halves, mean=mean, whole=whole, weights=weights)


def test_ddp_gradients_equal_one_process_on_the_same_halves(ddp_and_one_process):
    """Each rank's gradient after DDP's backward is the mean of the two ranks' own gradients, and so equals one process's
    mean of the gradients of the two halves of the global batch: (∇ℓ(half₀) + ∇ℓ(half₁)) / 2.

    What is mathematically equal. The STMN loss does not decompose over clips: training-mode BatchNorm normalises by
    the statistics of the batch it is given, the batch-hard triplet takes each anchor's hardest negative within that
    batch, and the spread losses take a min and a max over it. Under DDP each rank forwards its own half (BatchNorm
    statistics per rank, unless sync_bn on CUDA), so DDP computes the mean of the halves' gradients, not the gradient
    of the loss of the 8 clips at once; the reference is therefore one process forwarding and back-propagating each
    half separately and averaging. (That the whole-batch gradient is a different number is asserted below, so the
    comparison distinguishes the two.)

    Tolerance. Each rank's backward on its half is the reference's backward on that half: the same weights (DDP
    broadcasts rank 0's; both are build_model's seeded initialisation), the same clips (the sampler hands rank r the
    r-th half of the global batch: asserted), the same kernels on one thread. DDP then divides by the world size 2, a
    power of two (exact in binary), and gloo adds the two ranks' values, one fp32 addition per element, commutative;
    the reference performs the same addition and halving. So the expected difference is zero; the bound allows
    ULPS = 4 units of fp32 roundoff of each tensor's largest entry (|Δ| ≤ 4·2⁻²⁴·max|g|), for one addition rounded
    in another order. A rank that does not average, sums, or scales its gradient by even 1 + 10⁻⁵ is far outside it.
    """
    d = ddp_and_one_process
    ranks, mean = d["ranks"], d["mean"]
    assert [r["items"] for r in ranks] == d["halves"] and sum(d["halves"], []) == d["items"], "the ranks' batches are not the global batch's halves"
    for r, got in enumerate(ranks):
        assert set(got["grads"]) == set(mean) and all(g is not None for g in got["grads"].values())
        err, name = worst(got["grads"], mean)
        assert err <= ULPS * FLOAT32_UNIT_ROUNDOFF, (
            f"rank {r}: DDP's gradient of {name} differs from one process's mean of the halves' gradients by "
            f"{err:.3g} of its largest entry (bound {ULPS} ulps = {ULPS * FLOAT32_UNIT_ROUNDOFF:.2g})")
    assert all(torch.equal(ranks[0]["grads"][n], ranks[1]["grads"][n]) for n in mean), "the ranks hold different gradients after the all-reduce"
    assert [r["wrapped"] for r in ranks] == ["DistributedDataParallel"] * WORLD, "the learner did not wrap the model in DDP"
    err, name = worst(d["whole"], mean)
    assert err > 1e3 * ULPS * FLOAT32_UNIT_ROUNDOFF, f"the whole batch's gradient equals the halves' mean ({name}: {err:.3g}): the reference distinguishes nothing"


def test_ddp_adam_step_equals_one_process(ddp_and_one_process):
    """After `train_step`'s Adam step every rank holds the weights one process reaches by stepping with the halves' mean
    gradient. Adam's first step is lr·m̂/(√v̂ + ε) ≈ lr·sign(g): nearly blind to the gradient's scale, so this checks
    the step (same optimizer, same averaged gradient on every rank), not the averaging, which the gradient test checks.
    The same bound: equal gradients give equal updates, operation for operation."""
    d = ddp_and_one_process
    for r, got in enumerate(d["ranks"]):
        err, name = worst(got["weights"], d["weights"])
        assert err <= ULPS * FLOAT32_UNIT_ROUNDOFF, f"rank {r}: weights of {name} after the step differ by {err:.3g} of their largest entry"
    assert all(torch.equal(d["ranks"][0]["weights"][n], d["ranks"][1]["weights"][n]) for n in d["weights"]), "the ranks' weights diverged"
