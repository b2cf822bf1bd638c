"""`make gpu-check`: every CUDA branch of the project exercised and measured in one command that fits in 8 minutes on one
H100-class GPU, writing `gpu.md` and `gpu.json` after each section, so that whatever finished is on disk even if
the machine is taken back: into `runs/gpu-check/` by default, into `bench/` (the committed record) with `--out bench`
(`make gpu-record`). Without CUDA the same command runs what it can on the CPU with tiny shapes (about
a minute, inside `make test`) and lists the CUDA-only checks as skipped.

It needs only a Python with torch, torchvision, numpy, scipy, pandas, matplotlib, seaborn, h5py, Pillow and tqdm:
`PYTHONPATH=. python bench/gpu_check.py --wheels wheels/py3.12` installs what else the notebooks need (papermill,
ipykernel, submitit and their dependencies) from a wheel folder filled beforehand by `make gpu-wheels PY=3.12`;
nothing is downloaded here. Sections run in order of value, each under its own time budget (a slow one is stopped
and reported, the next one runs); a failed check is reported and the next section runs.
"""
from __future__ import annotations
import importlib.util, json, math, os, shutil, signal, subprocess, sys, tempfile, time, traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_PACKAGES = ("papermill", "ipykernel", "submitit")           # what a bare GPU machine lacks (the notebooks' runtime)
TOTAL_S = 470                                                         # the whole command: under 8 minutes
PAPER = dict(backbone="resnet50", height=256, width=128, P=8, K=4, L=6)   # the paper's configuration (DECISIONS.md)


class SectionTimeout(Exception):
    "A section ran past its budget."


def _alarm(signum, frame): raise SectionTimeout()


class Check:
    "The results of one run of the command: sections' numbers and checks, written after each section."
    def __init__(self, out_dir: Path, device: str, tiny: bool):
        import torch
        from stmn.speed import environment_info
        self.out, self.device, self.tiny, self.t0 = Path(out_dir), device, tiny, time.time()
        self.results = dict(environment=environment_info(device), mode="tiny shapes on the CPU" if tiny else "CUDA",
                            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, sections={})
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def left(self) -> float: return TOTAL_S - (time.time() - self.t0)

    def run(self, name: str, title: str, budget_s: float, fn, cuda_only: bool = False):
        "Run section `fn(self, record)` under `budget_s` (less if the total is nearly spent); record its outcome; write the files."
        sec = self.results["sections"][name] = dict(title=title, budget_s=budget_s, checks=[], numbers={}, skipped=[])
        if cuda_only and self.tiny:
            sec.update(status="skipped", reason="needs CUDA"); return self.write()
        budget = min(budget_s, self.left())
        if budget < 5:
            sec.update(status="skipped", reason=f"out of time: {TOTAL_S} s for the whole command were spent"); return self.write()
        t = time.time(); old = signal.signal(signal.SIGALRM, _alarm); signal.setitimer(signal.ITIMER_REAL, budget)
        try:
            fn(self, sec); sec["status"] = "failed" if any(not c["ok"] for c in sec["checks"]) else "passed" if sec["checks"] else "skipped"
            if sec["status"] == "skipped": sec["reason"] = "; ".join(sec["skipped"])
        except SectionTimeout: sec.update(status="timed out", reason=f"stopped after its budget of {budget:.0f} s")
        except Exception as e: sec.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        finally: signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)
        sec["seconds"] = round(time.time() - t, 1)
        print(f"[{sec['seconds']:6.1f} s] {name}: {sec['status']}" + (f" ({sec.get('reason')})" if sec.get("reason") else ""), flush=True)
        for c in sec["checks"]: print(f"           {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}", flush=True)
        self.write()

    def write(self):
        from stmn.base import atomic_write
        self.results["seconds"] = round(time.time() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out/"gpu.json", lambda f: f.write(json.dumps(self.results, indent=1, default=str).encode()))
        atomic_write(self.out/"gpu.md", lambda f: f.write(markdown(self.results).encode()))


def check(sec, name: str, ok: bool, detail: str):
    sec["checks"].append(dict(name=name, ok=bool(ok), detail=detail))


# --------------------------------------------------------------------------------------------------------------------
# helpers

def params(c: Check, **change):
    "The run's `RunConfig`: the synthetic recipe and the paper's M, N, α, on this device, with `change`."
    from stmn.recipes import RunConfig
    p = dict(dataset="synth", model="stmn", seed=0, pretrained=False, workers=0, erasing=True,
             device=str(c.device), out_dir=str(c.work/"run"), ckpt_every=0, amp="", channels_last=None, compile=False,
             data_root="", synth_seed=0, protocol="", split=None, trial=0, ap="plain", resume="auto", nproc=1, sync_bn=False)
    return RunConfig(**{**p, **change})


def synthetic(c: Check, height: int, width: int, ids: int):
    "Training tracklets of a small synthetic set rendered at `height`×`width` (generated once per size)."
    from stmn.synth import SynthConfig, make_synthetic_mars
    from stmn.mars import read_mars
    root = c.work/f"synth-{height}x{width}-{ids}"
    if not root.exists():
        make_synthetic_mars(root, SynthConfig(n_train_ids=ids, n_test_ids=2, n_distractor_tracklets=1, n_junk_tracklets=1,
                                              min_frames=8, max_frames=16, height=height, width=width))
    return read_mars(root).train


def batches(learner, n: int):
    "The first `n` training batches of `learner`'s sampler (a pure function of the seed and the epoch)."
    import torch
    out, epoch = [], 0
    while len(out) < n:
        dl = torch.utils.data.DataLoader(learner.data, batch_sampler=learner.sampler.batches(epoch), num_workers=0)
        out += [(x, y) for x, y, _ in dl][: n - len(out)]; epoch += 1
    return out


def losses(c: Check, p: dict, data, n_ids: int, steps: int, tmp: str, fused: bool = True) -> list[float]:
    "Per-step training losses of a fresh model with parameters `p` on the same batches (`fused=False`: Adam's plain kernels)."
    import torch
    from stmn.learner import Learner
    from stmn.recipes import build_model
    l = Learner(build_model(p, n_ids), data, p, c.work/tmp, c.device)
    if not fused:
        for g in l.opt.param_groups: g["fused"], g["foreach"] = False, False
    out = [l.train_step(x, y)[0] for x, y in batches(l, steps)]
    return [float(v) for v in torch.stack(out).cpu()]


# --------------------------------------------------------------------------------------------------------------------
# 1. correctness

def bf16_against_fp32(c: Check, sec):
    """bf16 autocast (memories, LSTM, softmaxes and losses kept in fp32) against fp32, 50 steps of the paper's configuration
    from scratch on synthetic frames at 256×128, the same batches. bf16 keeps 8 significant bits, so one forward's loss
    differs by a fraction of a percent, and over 50 Adam steps the two trajectories separate as any two numerically
    different runs do: the check is on the curve's level (mean |Δ| / loss ≤ 5 %, first step ≤ 2 %) and that both fall."""
    shape = PAPER if not c.tiny else dict(backbone="resnet10", height=32, width=16, P=2, K=2, L=3)
    steps = 50 if not c.tiny else 1
    data = synthetic(c, shape["height"], shape["width"], ids=16 if not c.tiny else 4)
    n = len({t.pid for t in data})
    fp32 = losses(c, params(c, **shape, amp="fp32", channels_last=False), data, n, steps, "fp32")
    bf16 = losses(c, params(c, **shape, amp="bf16"), data, n, steps, "bf16")
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    sec["numbers"].update(steps=steps, fp32=fp32, bf16=bf16, first_rel=rel[0], mean_rel=sum(rel) / len(rel), shape=shape)
    check(sec, "first step", rel[0] <= .02, f"fp32 {fp32[0]:.4f}, bf16 {bf16[0]:.4f} ({100 * rel[0]:.2f} %)")
    check(sec, "curve", sum(rel) / len(rel) <= .05, f"mean |Δ|/loss over {steps} steps {100 * sum(rel) / len(rel):.2f} %")
    if steps >= 20:
        fall = lambda v: sum(v[-10:]) / 10 < sum(v[:10]) / 10
        check(sec, "both fall", fall(fp32) and fall(bf16), f"first/last 10 steps: fp32 {sum(fp32[:10]) / 10:.3f}→{sum(fp32[-10:]) / 10:.3f}, "
                                                         f"bf16 {sum(bf16[:10]) / 10:.3f}→{sum(bf16[-10:]) / 10:.3f}")


def layouts(c: Check, sec):
    "channels-last and fused Adam (the CUDA defaults, fp32 here) give the first-step loss of NCHW with Adam's plain kernels, and the second."
    shape = PAPER if not c.tiny else dict(backbone="resnet10", height=32, width=16, P=2, K=2, L=3)
    data = synthetic(c, shape["height"], shape["width"], ids=16 if not c.tiny else 4)
    n = len({t.pid for t in data})
    nchw = losses(c, params(c, **shape, amp="fp32", channels_last=False), data, n, 2, "nchw", fused=False)
    nhwc = losses(c, params(c, **shape, amp="fp32", channels_last=True), data, n, 2, "nhwc")   # fused Adam on CUDA (the Learner's)
    rel = [abs(a - b) / abs(a) for a, b in zip(nchw, nhwc)]
    sec["numbers"].update(nchw_plain_adam=nchw, channels_last_fused_adam=nhwc, fused_adam=c.device != "cpu")
    check(sec, "first step", rel[0] <= 1e-3, f"NCHW {nchw[0]:.6f}, channels-last {nhwc[0]:.6f} (rel {rel[0]:.1e})")
    check(sec, "second step (after one Adam update)", rel[1] <= 1e-2, f"NCHW {nchw[1]:.6f}, channels-last {nhwc[1]:.6f} (rel {rel[1]:.1e})")


def resume(c: Check, sec):
    """Killed at step k and resumed: the losses and weights of an uninterrupted run, bit for bit, under
    `torch.use_deterministic_algorithms`; and a background (async) checkpoint equals a synchronous one."""
    import torch
    from stmn.learner import Learner
    from stmn.recipes import build_model
    import warnings
    torch.use_deterministic_algorithms(True, warn_only=True)          # an op without a deterministic kernel warns: recorded below
    caught = warnings.catch_warnings(record=True); seen = caught.__enter__(); warnings.simplefilter("always")
    try:
        p = params(c, backbone="resnet18" if not c.tiny else "resnet10", height=64 if not c.tiny else 32, width=32 if not c.tiny else 16,
                   P=4, K=2, L=4 if not c.tiny else 2, ckpt_every=2, epochs=2, lr_step=100,
                   **({"model": "baseline"} if c.tiny else {}))                # on the CPU: the same loop, smaller checkpoints
        data = synthetic(c, p.height, p.width, ids=16 if not c.tiny else 8)
        n = len({t.pid for t in data})
        run = lambda d, **kw: Learner(build_model(replace(p, **kw), n), data, replace(p, **kw), c.work/d, c.device)
        straight = run("straight"); straight.fit(p.epochs, progress=False)
        killed = run("killed"); real = killed.train_step; calls = []
        stop_at = p.epochs * len(killed.sampler) - 1                # dies before its last step but one: resumes from a checkpoint
        def step(*b):
            calls.append(1)
            if len(calls) == stop_at: raise KeyboardInterrupt("killed")
            return real(*b)
        killed.train_step = step
        try: killed.fit(p.epochs, progress=False)
        except KeyboardInterrupt: pass
        resumed = run("killed"); resumed.fit(p.epochs, progress=False)
        from stmn.base import read_events
        start = read_events(c.work/"killed", "train")[-1]                   # where the second process began
        same = resumed.step_losses == straight.step_losses
        weights = all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()))
        gap = max(abs(a - b) for a, b in zip(resumed.step_losses, straight.step_losses))
        ops = sorted({str(w.message).split(" does not have")[0][:120] for w in seen if "deterministic" in str(w.message)})
        sec["numbers"].update(max_loss_difference=gap, nondeterministic_ops=ops)
        check(sec, f"resumed after a kill at step {stop_at} of {len(straight.step_losses)}", same and weights and len(calls) == stop_at and start["resumed"],
              f"continued from epoch {start['epoch']}, step {start['step']}; {len(straight.step_losses)} step losses {'equal' if same else f'differ by up to {gap:.2e}'}, weights "
              f"{'equal' if weights else 'differ'}" + (f"; ops without a deterministic kernel: {', '.join(ops)}" if ops else ""))
        a = run("async", async_save=True); s = run("sync", async_save=False)
        for l in (a, s): l.fit(1, progress=False)
        sa, ss = (torch.load(c.work/d/"checkpoint.pt", map_location="cpu", weights_only=False) for d in ("async", "sync"))
        eq = all(torch.equal(x, y) for x, y in zip(sa["model"].values(), ss["model"].values())) and sa["step_losses"] == ss["step_losses"]
        check(sec, "background checkpoint = synchronous", eq, f"weights and losses {'equal' if eq else 'differ'}")
    finally:
        caught.__exit__(None, None, None); torch.use_deterministic_algorithms(False)


def evaluation(c: Check, sec):
    "The torch evaluation path equals the numpy one on a MARS-sized matrix (1,980 × 11,310; a small one on the CPU)."
    import numpy as np, torch
    from stmn.evaluation import evaluate, evaluate_torch
    nq, ng = (1980, 11310) if not c.tiny else (200, 1500)
    rng = np.random.default_rng(0)
    gp = rng.integers(1, 630, ng); gp[: int(.29 * ng)] = 0; gp[int(.29 * ng): int(.37 * ng)] = -1
    gc, qi = rng.integers(1, 7, ng), rng.choice(np.arange(int(.37 * ng), ng), nq, replace=False)
    D = rng.random((nq, ng), dtype=np.float32)
    t = time.perf_counter(); ref = evaluate(D, gp[qi], gp, gc[qi], gc); t_np = time.perf_counter() - t
    Dt = torch.from_numpy(D).to(c.device); evaluate_torch(Dt, gp[qi], gp, gc[qi], gc)
    t = time.perf_counter(); got = evaluate_torch(Dt, gp[qi], gp, gc[qi], gc); t_torch = time.perf_counter() - t
    same = np.allclose(ref["cmc"], got["cmc"]) and np.allclose(ref["ap"], got["ap"], equal_nan=True, atol=1e-6)
    sec["numbers"].update(shape=[nq, ng], numpy_s=t_np, torch_s=t_torch, mAP=float(ref["mAP"]))
    check(sec, f"torch on {c.device} = numpy", same, f"{nq}×{ng}: mAP {ref['mAP']:.6f} / {got['mAP']:.6f}; numpy {t_np:.2f} s, torch {t_torch:.3f} s")


def speed_summary(speed: dict) -> str:
    "The learner's resolved speed settings in one line: 'amp bf16, channels-last, …'."
    flags = [name.replace("_", "-") for name in ("channels_last", "compile", "async_save") if speed.get(name)]
    return ", ".join([f"amp {speed['amp']}", *flags, f"{speed['workers']} loader workers"])


def ddp(c: Check, sec):
    "torchrun with NCCL trains an epoch with SyncBatchNorm, `nproc 1` (and 2 where two GPUs exist), on the default synthetic set; gloo on the CPU."
    import torch
    from stmn.ddp import launch
    if c.tiny:                                                        # one torchrun less: the notebook's run is the check
        sec["skipped"].append("on the CPU, torchrun (gloo, 2 processes) runs inside the notebooks section: train.ipynb with nproc 2")
        return
    gpus = torch.cuda.device_count()
    for nproc in ([1, 2] if gpus >= 2 else [1]):
        p = params(c, backbone="resnet10", height=32, width=16, P=8, K=2, L=3, epochs=1, lr_step=100, test_sampling="rrs",
                   sync_bn=c.device != "cpu", out_dir=str(c.work/f"ddp{nproc}"), nproc=nproc, resume="")
        t = time.perf_counter(); m = launch(p, nproc, timeout=120); sec["numbers"][f"nproc{nproc}_s"] = time.perf_counter() - t
        ok = m.get("world_size") == nproc and math.isfinite(m["history"][-1]["loss"])
        backend = "NCCL, SyncBatchNorm" if c.device != "cpu" else "gloo"
        check(sec, f"torchrun nproc {nproc} ({backend})", ok, f"world size {m.get('world_size')}, loss {m['history'][-1]['loss']:.3f}, mAP {m['mAP']:.3f}")
    if gpus < 2: sec["skipped"].append("nproc 2: fewer than two GPUs")


# --------------------------------------------------------------------------------------------------------------------
# 2. speed

def speed(c: Check, sec):
    """The STMN step at the paper's configuration in fp32, bf16, bf16 + channels-last and compiled; the plain ResNet-50 step
    on the same frames; frames/s and MFU (counted FLOPs over the datasheet peak); the largest P×K that fits; the loader with
    this machine's cores against the model; extraction frames/s with flips, MARS's test set extrapolated; peak memory
    for a 60- and a 920-frame tracklet."""
    import torch
    from stmn.base import Tracklet
    from stmn.learner import Learner
    from stmn.losses import stmn_loss
    from stmn.recipes import build_model, auto_workers
    from stmn.speed import (time_train_step, train_flops, FrameClassifier, frame_classifier_loss, peak_tflops, largest_batch,
                            loader_rate, sync)
    from stmn.evaluation import extract_features
    gpu, N = c.device != "cpu", sec["numbers"]
    shape = PAPER if gpu else dict(backbone="resnet10", height=32, width=16, P=2, K=2, L=3)
    ids = [Tracklet(("x.jpg",), pid, 1) for pid in range(625)]
    B, L = shape["P"] * shape["K"], shape["L"]
    x = torch.randn(B, L, 3, shape["height"], shape["width"], generator=torch.Generator().manual_seed(0))
    y = torch.arange(shape["P"]).repeat_interleave(shape["K"])
    variants = [("fp32", dict(amp="fp32", channels_last=False)), ("bf16", dict(amp="bf16", channels_last=False)),
                ("bf16 + channels-last", dict(amp="bf16", channels_last=True)), ("bf16 + channels-last + compile", dict(amp="bf16", channels_last=True, compile=True))]
    if not gpu: variants = variants[:1]
    fl = train_flops(lambda: build_model(params(c, **shape), 625), x, y, lambda o, t: stmn_loss(o, t, .3)[0])
    N["gflop_per_trained_frame"] = fl["step"] / (B * L) / 1e9
    steps = {}
    for name, kw in variants + [("plain ResNet-50, bf16 + channels-last" if gpu else "plain ResNet, fp32", dict(amp="bf16" if gpu else "fp32", channels_last=gpu, plain=True))]:
        plain = kw.pop("plain", False); p = params(c, **shape, **kw)
        torch.manual_seed(0)
        l = Learner(FrameClassifier(625, shape["backbone"]) if plain else build_model(p, 625), ids, p, c.work/"speed", c.device)
        if plain: l.loss = frame_classifier_loss
        r = time_train_step(l, x, y, steps=5 if gpu else 2, warmup=3 if gpu else 1)
        peak = peak_tflops(torch.cuda.get_device_name(), p.amp if p.amp else "fp32") if gpu else None
        r["mfu"] = fl["step"] / r["step_s"] / 1e12 / peak if (peak and not plain) else None
        steps[name] = r; print(f"           {name}: {r['frames_per_s']:.0f} frames/s" + (f", MFU {100 * r['mfu']:.1f} %" if r["mfu"] else ""), flush=True)
        if name == "bf16 + channels-last" and gpu: N["largest_batch"] = largest_batch(l, L, shape["height"], shape["width"], K=shape["K"], Ps=(8, 16, 32, 48, 64))
        del l; torch.cuda.empty_cache() if gpu else None
    N["train_step"] = {k: dict(frames_per_s=v["frames_per_s"], step_s=v["step_s"], peak_gb=v["peak_gb"], mfu=v["mfu"]) for k, v in steps.items()}
    best = max((v for k, v in steps.items() if not k.startswith("plain")), key=lambda v: v["frames_per_s"])
    N["best_frames_per_s"] = best["frames_per_s"]
    check(sec, "every variant steps", all(math.isfinite(v["step_s"]) for v in steps.values()), f"{len(steps)} variants timed")
    # the loader against the model
    data = synthetic(c, shape["height"], shape["width"], ids=16 if gpu else 4)
    w = auto_workers(c.device)
    r = loader_rate(data, L, shape["height"], shape["width"], P=min(shape["P"], len({t.pid for t in data})), K=shape["K"], workers=w,
                    batches=12 if gpu else 2, pin_memory=gpu)
    N["loader"] = dict(workers=w, frames_per_s=r["frames_per_s"], model_frames_per_s=best["frames_per_s"], ratio=r["frames_per_s"] / best["frames_per_s"])
    # extraction: the model in eval mode on clips and their flips, as all-frames evaluation does
    p = params(c, **shape, amp="bf16" if gpu else "fp32", channels_last=gpu); m = build_model(p, 625).to(c.device).eval()
    if gpu: m.to(memory_format=torch.channels_last)
    xe = torch.randn(32, L, 3, shape["height"], shape["width"], device=c.device)
    with torch.no_grad(), torch.autocast(c.device.split(":")[0], torch.bfloat16, enabled=gpu):
        m(xe); m(xe.flip(-1)); sync(torch.device(c.device)); t = time.perf_counter()
        for _ in range(3 if gpu else 1): m(xe); m(xe.flip(-1))
        sync(torch.device(c.device))
    fps = (3 if gpu else 1) * 32 * L / (time.perf_counter() - t)
    N["extraction"] = dict(frames_per_s=fps, mars_test_minutes=681089 / fps / 60)
    if gpu:
        t0 = data[0]; N["peak_gb_by_length"] = {}
        for length in (60, 920):
            long = Tracklet(tuple((t0.frames * length)[:length]), t0.pid, t0.camid)
            torch.cuda.reset_peak_memory_stats(); extract_features(m, [long], L, shape["height"], shape["width"], "all", device=c.device)
            N["peak_gb_by_length"][length] = torch.cuda.max_memory_allocated() / 1e9
    else: sec["skipped"] += ["bf16, channels-last and compiled steps, MFU, largest batch, peak memory by tracklet length: need CUDA"]


# --------------------------------------------------------------------------------------------------------------------
# 3. the memory question at GPU budget

def memory_question(c: Check, sec):
    """The memory study's recipe (`stmn.memory_study.STUDY_RECIPE`, bench/memory_study/PLAN.md) at GPU budget: STMN and
    the baseline from the study's pretrained trunk on the `strong` distractor dose, seed 0, the same number of steps (as
    many as fit in the budget's first half for STMN), paired; rank-1/mAP, the spatial read-out BN's mean |w| along the
    way (0 at the start: the memory is "off" until it grows), and STMN's mechanism report at the end."""
    import torch
    from stmn.data import load_dataset
    from stmn.learner import Learner
    from stmn.recipes import build_model
    from stmn.evaluation import evaluate_model
    from stmn.synth import distractor_options
    from stmn.pretrain import pretrain_trunk
    from stmn.memory_study import STUDY_PRESETS
    from stmn.analysis import mechanism_report, format_mechanism
    study = STUDY_PRESETS["smoke" if c.tiny else "study"]
    trunk = pretrain_trunk(study.pretrain, root=c.work, log=lambda line: None)       # seconds on a GPU; the study's file
    dose = "default" if c.tiny else "strong"
    tiny = dict(n_train_ids=4, n_test_ids=2, n_distractor_tracklets=1, n_junk_tracklets=1, max_frames=10) if c.tiny else {}
    ds = load_dataset("synth", c.work/f"mq-{dose}", seed=0, **distractor_options(dose), **tiny)
    n = len({t.pid for t in ds.train})
    each = max(5., (c.left() - 30) / 2.4) if not c.tiny else 2.
    out, steps_stmn = {}, None
    for model in ("stmn", "baseline"):
        p = params(c, model=model, pretrained=str(trunk), synth_distractors=dose, **study.recipe)
        l = Learner(build_model(p, n), ds.train, p, c.work/f"mq-{model}", c.device)
        memory = bool(l.model.readout_weight())                          # STMN: the read-out BN's |w|; the baseline: none
        curve, step, t, epoch = [], 0, time.time(), 0
        while (steps_stmn is None and time.time() - t < each) or (steps_stmn is not None and step < steps_stmn):
            for xb, yb, _ in torch.utils.data.DataLoader(l.data, batch_sampler=l.sampler.batches(epoch), num_workers=0):
                l.train_step(xb, yb); step += 1
                if memory and step % 200 == 0: curve.append((step, l.model.readout_weight()["readout_w_mean"]))
                if (steps_stmn is None and time.time() - t >= each) or (steps_stmn is not None and step >= steps_stmn): break
            epoch += 1
        seconds = time.time() - t; steps_stmn = steps_stmn or step
        r = evaluate_model(l.model, ds, p.L, p.height, p.width, "rrs", device=c.device)
        out[model] = dict(steps=step, seconds=seconds, rank1=r["rank1"], mAP=r["mAP"], readout_bn_abs_w=curve + ([(step, l.model.readout_weight()["readout_w_mean"])] if memory else []))
        if model == "stmn": out[model]["mechanism"] = mechanism_report(l.model, ds, p.L, p.height, p.width, c.device)
        print(f"           {model}: {step} steps in {seconds:.0f} s, rank-1 {100 * r['rank1']:.1f} %, mAP {100 * r['mAP']:.1f} %", flush=True)
    sec["numbers"].update(out)
    w = out["stmn"]["readout_bn_abs_w"][-1][1]
    check(sec, "paired runs", out["stmn"]["steps"] == out["baseline"]["steps"],
          f"{out['stmn']['steps']} steps each, dose {dose}, pretrained trunk; STMN {100 * out['stmn']['rank1']:.1f}/{100 * out['stmn']['mAP']:.1f}, "
          f"baseline {100 * out['baseline']['rank1']:.1f}/{100 * out['baseline']['mAP']:.1f} (rank-1/mAP %); read-out BN mean |w| {w:.4f}; "
          + format_mechanism(out["stmn"]["mechanism"]))


# --------------------------------------------------------------------------------------------------------------------
# 4. the notebooks

def notebooks(c: Check, sec):
    "`papermill nbs/train.ipynb` on the synthetic dataset with the device's defaults, then `nbs/figures.ipynb` on its checkpoint (CUDA)."
    import papermill as pm
    ensure_kernel(c)
    out = c.work/"nb-train"
    tiny = dict(backbone="resnet10", height=32, width=16, P=8, K=2, L=3, epochs=1, test_sampling="rrs", nproc=2) if c.tiny else {}
    # on CUDA the synthetic recipe as it is, with the GPU defaults; on the CPU tiny shapes, through torchrun (gloo)
    t = time.perf_counter()
    pm.execute_notebook(str(ROOT/"nbs/train.ipynb"), str(c.work/"train.ipynb"), parameters=dict(out_dir=str(out), **tiny),
                        cwd=str(ROOT), kernel_name="stmn", progress_bar=False)
    m = json.loads((out/"metrics.json").read_text())
    sec["numbers"]["train"] = dict(seconds=time.perf_counter() - t, rank1=m["rank1"], mAP=m["mAP"], speed=m.get("speed"), epochs=m["epochs_trained"])
    check(sec, "train.ipynb", (out/"checkpoint.pt").exists(), f"{m['epochs_trained']} epochs in {time.perf_counter() - t:.0f} s, "
          f"rank-1 {100 * m['rank1']:.1f} %, mAP {100 * m['mAP']:.1f} %, resolved speed settings {speed_summary(m['speed'])}")
    if c.tiny: check(sec, "torchrun with 2 processes (gloo), launched by the notebook", m.get("world_size") == 2, f"world size {m.get('world_size')}")
    if c.tiny: sec["skipped"].append("figures.ipynb: trains three more models, CUDA only"); return
    t = time.perf_counter()
    pm.execute_notebook(str(ROOT/"nbs/figures.ipynb"), str(c.work/"figures.ipynb"), cwd=str(ROOT), kernel_name="stmn", progress_bar=False,
                        parameters=dict(checkpoint=str(out/"checkpoint.pt"), out_dir=str(c.work/"figures"), runs_dir=str(c.work/"figure-runs"), epochs=8))
    made = sorted(p.name for p in (c.work/"figures").glob("*.png"))
    sec["numbers"]["figures"] = dict(seconds=time.perf_counter() - t, files=made)
    check(sec, "figures.ipynb", len(made) >= 4, f"{len(made)} figures in {time.perf_counter() - t:.0f} s")


def ensure_kernel(c: Check):
    """A Jupyter kernel named 'stmn' (what the notebooks name) for this very Python, registered in the check's scratch
    folder and put first on JUPYTER_PATH: it shadows any other 'stmn' kernel for this command only."""
    prefix = c.work/"jupyter"
    if not (prefix/"share/jupyter/kernels/stmn").exists():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "stmn",
                        "--display-name", "Python (stmn, gpu-check)"], check=True, stdout=subprocess.DEVNULL)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(prefix/"share/jupyter"), os.environ.get("JUPYTER_PATH")]))


# --------------------------------------------------------------------------------------------------------------------

SECTIONS = [  # name, title, budget on CUDA (s), function, CUDA only — in order of value
    ("bf16", "bf16 autocast against fp32, 50 steps at the paper's configuration", 60, bf16_against_fp32, False),
    ("layouts", "channels-last and fused Adam against NCHW fp32", 20, layouts, False),
    ("resume", "resume after a kill, bit for bit; background checkpoint writes", 40, resume, False),
    ("evaluation", "torch evaluation path against numpy, MARS-sized", 20, evaluation, False),
    ("ddp", "torchrun: NCCL, SyncBatchNorm", 60, ddp, False),
    ("speed", "speed: steps, MFU, largest batch, loader, extraction, memory by tracklet length", 110, speed, False),
    ("notebooks", "the notebooks: train.ipynb, then figures.ipynb on its checkpoint", 150, notebooks, False),
    ("memory", "the memory study's recipe at GPU budget: STMN and the baseline from the pretrained trunk, strong dose, paired", 200, memory_question, False),
]


def table_cell(text: str) -> str:
    "`text` inside a Markdown table cell: its pipes escaped (|Δ| stays |Δ|), its line breaks as spaces."
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(R: dict) -> str:
    "The results as `bench/gpu.md`."
    env = R["environment"]
    out = [f"# GPU check ({env['device']})", "",
           f"`make gpu-check` on {R['date']} ({R['mode']}): torch {R['torch']}, Python {env['python']}; {R.get('seconds', 0):.0f} s in all "
           f"(budget {TOTAL_S} s). Each section's numbers are in `gpu.json`.", "",
           "| section | status | seconds | checks |", "|---|---|---|---|"]
    for name, s in R["sections"].items():
        checks = "; ".join(f"{'✓' if c['ok'] else '✗'} {c['name']}: {c['detail']}" for c in s["checks"])
        if not checks: text = f"skipped: {s.get('reason', '')}"       # the reason already lists what was skipped
        else: text = checks + (("; skipped: " + "; ".join(s["skipped"])) if s.get("skipped") else "")
        out.append(f"| {s['title']} | {s['status']} | {s.get('seconds', '–')} | {table_cell(text)} |")
    sp = R["sections"].get("speed", {}).get("numbers", {})
    if sp.get("train_step"):
        out += ["", "## Training step", "", f"{sp['gflop_per_trained_frame']:.1f} GFLOP per trained frame (forward and backward, counted).", "",
                "| variant | frames/s | s/step | peak GB | MFU |", "|---|---|---|---|---|"]
        for k, v in sp["train_step"].items():
            mfu = "–" if v["mfu"] is None else f"{100 * v['mfu']:.1f} %"
            out.append(f"| {k} | {v['frames_per_s']:.0f} | {v['step_s']:.3f} | {v['peak_gb']:.2f} | {mfu} |")
    return "\n".join(out) + "\n"


def ensure_packages(wheels: str | None) -> list[str]:
    "Install the notebook packages this Python lacks from the local wheel folder `wheels` (never from the network); those still missing."
    missing = [m for m in NOTEBOOK_PACKAGES if importlib.util.find_spec(m) is None]
    if missing and wheels:
        if not Path(wheels).is_dir(): raise FileNotFoundError(f"--wheels {wheels}: no such folder; fill it with `make gpu-wheels PY=3.x`")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--quiet", *missing], check=True)
        importlib.invalidate_caches()
        missing = [m for m in NOTEBOOK_PACKAGES if importlib.util.find_spec(m) is None]
    return missing


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT/"runs/gpu-check"), help="folder for gpu.md and gpu.json (default: runs/gpu-check/; "
                                                                  "`make gpu-record` writes bench/, the committed record)")
    ap.add_argument("--wheels", default="", help="local wheel folder for papermill, ipykernel, submitit (make gpu-wheels)")
    ap.add_argument("--only", default="", help="comma-separated section names (default: all, in order)")
    ap.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu' (tiny shapes)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT)); os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")        # deterministic cuBLAS, for the resume check; set before CUDA starts
    missing = ensure_packages(a.wheels or None)
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    c = Check(Path(a.out), device, tiny=device == "cpu")
    print(f"gpu-check on {c.results['environment']['device']} ({c.results['mode']}), results → {a.out}/gpu.md", flush=True)
    only = set(filter(None, a.only.split(",")))
    for name, title, budget, fn, cuda_only in SECTIONS:
        if only and name not in only: continue
        if name == "notebooks" and missing:
            c.results["sections"][name] = dict(title=title, status="skipped", checks=[], numbers={}, skipped=[],
                                               reason=f"{', '.join(missing)} not installed: run `make gpu-wheels` where there is a registry and pass --wheels")
            c.write(); print(f"{name}: skipped ({c.results['sections'][name]['reason']})"); continue
        c.run(name, title, budget if device != "cpu" else 60, fn, cuda_only)
    shutil.rmtree(c.work, ignore_errors=True)
    bad = [n for n, s in c.results["sections"].items() if s["status"] in ("failed", "error", "timed out")]
    print(f"{len(c.results['sections'])} sections in {time.time() - c.t0:.0f} s; " + (f"not passed: {', '.join(bad)}" if bad else "all passed or skipped with a reason"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
