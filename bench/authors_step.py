"""Time one training step of the authors' STMN and of this project's at the same configuration, interleaved, in one process.

    python bench/authors_step.py PATH_TO_AUTHORS_STMN [--P 2] [--K 2] [--steps 3] [--device cpu] [--out FILE.json]

PATH is a local copy of cvlab-yonsei/STMN (the folder holding smem_tmem/model/network.py); nothing of it is copied
here, its modules are imported from there as tests/make_authors_fixture.py does. Both steps run at the authors'
configuration: ResNet-50 (random weights), 256×128, L = 6, M = 10, N = 5, 625 classes, fp32, Adam (lr 1e-4, weight
decay 1e-5), P × K tracklets. Theirs: `network.STMN` + their `Loss` + both spread terms, as their main.py sums them;
ours: this project's learner step with their two quirks switched on (`stem_relu=False`, `bnneck_train_weight=True`).
The steps alternate (theirs, ours, theirs, …) after one warm-up each, so both see the same machine state; the best
and the median of `--steps` are reported (on a shared machine single steps vary by ±15 %). Prints one JSON line (and writes it to --out).
"""
import argparse, json, statistics, sys, tempfile, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("repo", help="local copy of cvlab-yonsei/STMN"); ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--K", type=int, default=2); ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu"); ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if not Path(a.repo, "smem_tmem", "model", "network.py").is_file():
        sys.exit(f"authors_step: {a.repo!r} has no smem_tmem/model/network.py; pass a copy of cvlab-yonsei/STMN")
    dev = torch.device(a.device)
    real_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    sys.path.insert(0, str(ROOT/"tests"))
    from make_authors_fixture import authors_model                          # imports their modules, CPU-patched
    TheirSTMN, TheirLoss, _ = authors_model(Path(a.repo))
    if dev.type == "cuda": torch.Tensor.cuda, torch.nn.Module.cuda = real_cuda  # on a GPU their .cuda() calls must work
    from stmn.model import STMN, STMNConfig
    from stmn.learner import Learner
    from stmn.recipes import RunConfig
    from stmn.base import Tracklet
    from stmn.speed import sync

    torch.manual_seed(0)
    theirs = TheirSTMN(2048, num_class=625, stride=1).to(dev).train()
    their_loss = TheirLoss()
    opt = torch.optim.Adam(theirs.parameters(), lr=1e-4, weight_decay=1e-5)
    def their_step(x, y):
        out = theirs(x); parts = their_loss(out, y)
        total = parts["track_id"] + parts["trip"] + out["smem"]["loss"]["mem_trip"].mean() + out["tmem"]["loss"]["mem_trip"].mean()
        opt.zero_grad(); total.backward(); opt.step()

    p = RunConfig(dataset="mars", model="stmn", seed=0, pretrained=False, P=a.P, K=a.K,   # M, N, α: the paper's
                  workers=0, amp="fp32", channels_last=False)
    ours = STMN(STMNConfig(625, backbone="resnet50", M=10, N=5, L=6, stem_relu=False, bnneck_train_weight=True))
    with tempfile.TemporaryDirectory() as d:
        learner = Learner(ours, [Tracklet(("x.jpg",), pid, 1) for pid in range(625)], p, d, device=dev)
        x = torch.randn(a.P * a.K, 6, 3, 256, 128, device=dev); y = torch.arange(a.P, device=dev).repeat_interleave(a.K)
        def timed(f):
            sync(dev); t = time.perf_counter(); f(x, y); sync(dev)
            return time.perf_counter() - t
        timed(their_step); timed(learner.train_step)                       # warm-up
        t_theirs, t_ours = [], []
        for _ in range(a.steps): t_theirs.append(timed(their_step)); t_ours.append(timed(learner.train_step))
    frames, med = a.P * a.K * 6, statistics.median
    r = dict(device=str(dev), threads=torch.get_num_threads(), P=a.P, K=a.K, frames=frames, authors_step_s=min(t_theirs),
             stmn_step_s=min(t_ours), authors_all=t_theirs, stmn_all=t_ours, speedup=min(t_theirs) / min(t_ours),
             speedup_median=med(t_theirs) / med(t_ours),
             authors_frames_per_s=frames / min(t_theirs), stmn_frames_per_s=frames / min(t_ours))
    print(json.dumps(r))
    if a.out: Path(a.out).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
