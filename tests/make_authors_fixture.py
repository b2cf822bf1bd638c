"""Write tests/fixtures/authors_stmn.npz from the authors' STMN code (run once, by hand; CI never runs it).

    git clone https://github.com/cvlab-yonsei/STMN /somewhere/STMN
    git -C /somewhere/STMN checkout b0a1783          # their first release: per-location spatial memory
    python tests/make_authors_fixture.py /somewhere/STMN

It builds their `network.STMN` on the CPU (patching only what stops it running there: `.cuda()` calls, the ImageNet
download and the argparse call at import), fills every parameter and buffer with `seeded_tensor(name, shape)` of
tests/helpers.py, runs a seeded clip through it in eval mode (descriptor, f^o, f^s, memory addressing, temporal
attention) and in train mode (their loss terms), and saves names, shapes, input rule and outputs. No code of theirs
is copied: their modules are imported from the given folder.
"""
import json, subprocess, sys, types
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from helpers import seeded_tensor        # this folder: sys.path[0] when run as a script, before the authors' folders

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/"tests"/"fixtures"/"authors_stmn.npz"
B, L, H, W, CLASSES, M, N = 4, 6, 64, 32, 7, 10, 5          # 4 tracklets of 2 identities: every triplet term is defined
LABELS = [0, 0, 1, 1]


def authors_model(repo: Path):
    "Import the authors' network, loss and memory modules from `repo` on the CPU; return (STMN class, Loss class, memory module)."
    import torchvision
    sys.argv = [sys.argv[0], "--seq_len", str(L), "--smem_size", str(M), "--tmem_size", str(N)]
    sys.path[:0] = [str(repo/"smem_tmem"), str(repo)]
    torch.Tensor.cuda = lambda self, *a, **k: self                            # CPU: their code calls .cuda() inline
    torch.nn.Module.cuda = lambda self, *a, **k: self
    plain = torchvision.models.resnet50
    torchvision.models.resnet50 = lambda *a, **k: plain(weights=None)         # no ImageNet download; weights are refilled
    import model.network as network, model.loss as loss, model.memory as memory
    return network.STMN, loss.Loss, memory


def clip() -> torch.Tensor:
    "The input `[B, L, 3, H, W]`: N(0, 1) pixels from NumPy's generator seeded 2021."
    return torch.from_numpy(np.random.default_rng(2021).standard_normal((B, L, 3, H, W)).astype(np.float32))


def main(repo):
    repo = Path(repo)
    STMN, Loss, memory = authors_model(repo)
    net = STMN(2048, num_class=CLASSES, stride=1)
    sd = net.state_dict()
    names, shapes = list(sd), [list(v.shape) for v in sd.values()]
    net.load_state_dict({k: seeded_tensor(k, v.shape) for k, v in sd.items()})
    x = clip()
    labels = torch.tensor(LABELS)

    caught = {}                                                               # their softmaxes, in call order
    def recording_softmax(t, dim=None, **k):
        out = F.softmax(t, dim=dim, **k); caught.setdefault("softmax", []).append(out.detach()); return out
    memory.F = types.SimpleNamespace(normalize=F.normalize, softmax=recording_softmax)
    net.features.register_forward_hook(lambda m, i, o: caught.__setitem__("f_o", o[0].mean((2, 3)).detach()))
    net.smem.register_forward_hook(lambda m, i, o: caught.__setitem__("f_s", o["out"].detach()))

    net.eval()
    with torch.no_grad(): descriptor = net(x)["val_bn"]
    p_s, p_t, attn = caught.pop("softmax")                                    # smem r_att, tmem r_att, tmem read
    outputs = dict(descriptor=descriptor, f_o=caught["f_o"], f_s=caught["f_s"], p_s=p_s, p_t=p_t, attn=attn)

    net.train()
    out = net(x); parts = Loss()(out, labels)
    losses = dict(track_id=parts["track_id"], trip=parts["trip"],
                  spread_s=out["smem"]["loss"]["mem_trip"], spread_t=out["tmem"]["loss"]["mem_trip"])
    outputs.update({f"loss_{k}": v.detach().reshape(()) for k, v in losses.items()})

    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(names=names, shapes=shapes, input=dict(rule="numpy default_rng(2021).standard_normal, float32", shape=[B, L, 3, H, W]),
                labels=LABELS, M=M, N=N, L=L, classes=CLASSES, authors_commit=commit, torch=torch.__version__)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **{k: v.numpy().astype(np.float32) for k, v in outputs.items()})
    tmp.replace(OUT)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size/1e3:.0f} kB): {len(names)} tensors, authors' commit {commit[:7]}")
    for k, v in outputs.items(): print(f"  {k:18s} {tuple(v.shape)}  mean |x| {v.abs().mean():.4g}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1], "smem_tmem", "model", "network.py").is_file():
        sys.exit("usage: python tests/make_authors_fixture.py PATH_TO_AUTHORS_STMN_REPO (with smem_tmem/model/network.py)")
    main(sys.argv[1])
