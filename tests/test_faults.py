"""Fault injection: kills (also inside a save), torn and unwritable files, bad frames and layouts, NaN, sampler edges, network.

Each test asserts the exact behaviour issue 9 asks for. Training runs are tiny (ResNet-10, 32×16, 6 identities)."""
import json, os, signal, socket, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch
from stmn.base import DatasetLayoutError, BadImageError
from stmn.data import load_dataset
from stmn.mars import read_mars
from stmn.checkpoints import CheckpointError
from stmn.learner import Learner
from stmn.recipes import RunConfig, build_model
from stmn.base import previous_path
from stmn.sampling import PKSampler
from stmn.synth import SynthConfig, make_synthetic_mars

SMALL = SynthConfig(n_train_ids=6, n_test_ids=3, n_distractor_tracklets=1, n_junk_tracklets=1, max_frames=10)
P = dict(dataset="synth", model="stmn", backbone="resnet10", M=3, N=2, alpha=.3, L=4, P=3, K=2, height=32, width=16,
         epochs=3, lr_step=2, seed=0, workers=1, ckpt_every=1, test_sampling="rrs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_mars(tmp_path_factory.mktemp("faults")/"synth", SMALL)


CHILD = textwrap.dedent("""
    import os, signal, sys, json, torch
    from stmn.mars import read_mars
    from stmn.learner import Learner
    from stmn.recipes import RunConfig, build_model
    data, out, kill = sys.argv[1], sys.argv[2], sys.argv[3]
    p = RunConfig(**json.loads(sys.argv[4]))
    learner = Learner(build_model(p, 6), read_mars(data).train, p, out)
    what, n = kill.split(":") if kill else ("", "0")
    count = {"step": 0, "save": 0}
    if what == "step":                                    # SIGKILL right after optimizer step n
        step = learner.opt.step
        def killing_step(*a, **k):
            r = step(*a, **k); count["step"] += 1
            if count["step"] == int(n): os.kill(os.getpid(), signal.SIGKILL)
            return r
        learner.opt.step = killing_step
    if what == "save":                                    # SIGKILL inside save n, after half the bytes are written
        save = torch.save
        def killing_save(obj, f, *a, **k):
            count["save"] += 1
            if count["save"] == int(n):
                f.write(b"x" * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *a, **k)
        torch.save = killing_save
    learner.fit(p.epochs, progress=False)
""")


def child(data, out, kill=""):
    return subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), kill, json.dumps(KILLED)], capture_output=True, text=True, timeout=300)


def final(out):
    s = torch.load(Path(out)/"checkpoint.pt", weights_only=True)
    return s["step_losses"], s["model"], s["epoch"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    "The run never killed."
    ref = tmp_path_factory.mktemp("ref"); r = child(data, ref)
    assert r.returncode == 0, r.stderr[-2000:]
    return final(ref)


KILLED = dict(P, model="baseline", epochs=2)     # the kill runs: small checkpoints (STMN's own state resumes the same way: 08b_learner)

@pytest.mark.slow
def test_killed_run_resumes_to_the_same_run(data, reference, tmp_path):
    """SIGKILL four times in one run folder — after a step before any checkpoint, inside an epoch-end save, after a
    step mid-epoch, inside the last save — each time starting the same command again: the run that ends is the run
    never killed (bit-identical per-step losses and weights), and no temporary file is left."""
    cut = tmp_path/"cut"
    for kill, expect in (("step:1", (None, None)), ("save:2", (0, 1)), ("step:2", (1, 0)), ("save:2", (1, 1))):
        r = child(data, cut, kill)                                      # counts from the start of each process
        assert r.returncode == -signal.SIGKILL, (kill, r.stderr[-2000:])
        if expect[0] is None: assert not (cut/"checkpoint.pt").exists()
        else:
            s = torch.load(cut/"checkpoint.pt", weights_only=True)      # what the next start resumes from
            assert (s["epoch"], s["step"]) == expect, (kill, s["epoch"], s["step"])
        if kill.startswith("save"): assert [f for f in os.listdir(cut) if f.endswith(".tmp")]   # the killed save's temporary
    again = child(data, cut)
    assert again.returncode == 0, again.stderr[-2000:]
    (l1, w1, e1), (l2, w2, e2) = reference, final(cut)
    assert e1 == e2 == 2 and len(l1) == len(l2) == 4
    assert l1 == l2                                                     # bit-identical per-step losses
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not [f for f in os.listdir(cut) if f.endswith(".tmp")]      # removed when the run started again


def test_torn_checkpoint(data, tmp_path):
    p = RunConfig(**dict(P, epochs=1, workers=0))
    Learner(build_model(p, 6), read_mars(data).train, p, tmp_path).fit(1, progress=False)
    ckpt = tmp_path/"checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])                      # truncated on disk
    with pytest.raises(CheckpointError, match="checkpoint.pt"):      # named explicitly: an error, never a fresh start
        Learner(build_model(p, 6), read_mars(data).train, p, tmp_path).resume(str(ckpt))
    l = Learner(build_model(p, 6), read_mars(data).train, p, tmp_path).resume("auto")
    assert (l.epoch, l.step) == (0, 1)                               # the one before it
    previous_path(ckpt).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        Learner(build_model(p, 6), read_mars(data).train, p, tmp_path).resume("auto")


def test_unwritable_or_full_output(data, tmp_path):
    p = RunConfig(**dict(P, epochs=1, workers=0))
    (tmp_path/"file").write_text("a file, not a folder")
    with pytest.raises(OSError, match="not writable"):              # fails before any training
        Learner(build_model(p, 6), read_mars(data).train, p, tmp_path/"file"/"run")
    l = Learner(build_model(p, 6), read_mars(data).train, p, tmp_path/"run")
    l.fit(1, progress=False); before = (tmp_path/"run/checkpoint.pt").read_bytes()
    real = torch.save
    def full(obj, f, *a, **k): f.write(b"partial"); raise OSError(28, "No space left on device")
    torch.save = full
    try:
        with pytest.raises(OSError, match="cannot write .*checkpoint.pt: No space left"):
            l.save()
    finally:
        torch.save = real
    assert (tmp_path/"run/checkpoint.pt").read_bytes() == before     # the previous checkpoint is intact
    assert not [f for f in os.listdir(tmp_path/"run") if f.endswith(".tmp")]


def test_nan_loss_stops_naming_the_step_and_keeps_good_weights(data, tmp_path):
    p = RunConfig(**dict(P, workers=0))
    l = Learner(build_model(p, 6), read_mars(data).train, p, tmp_path)
    real, n = l.loss, {"k": 0}
    def poisoned(out, y):
        total, parts = real(out, y); n["k"] += 1
        if n["k"] == 3: parts = {**parts, "tri_s": torch.tensor(float("nan"))}; total = total + parts["tri_s"]
        return total, parts
    l.loss = poisoned
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 1: .*tri_s nan"):
        l.fit(3, progress=False)
    s = torch.load(tmp_path/"checkpoint.pt", weights_only=True)
    assert (s["epoch"], s["step"]) == (1, 0) and all(torch.isfinite(v).all() for v in s["model"].values() if v.is_floating_point())
    with torch.no_grad(): next(l.model.parameters()).fill_(float("nan"))
    before = (tmp_path/"checkpoint.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite weights"): l.save()
    assert (tmp_path/"checkpoint.pt").read_bytes() == before


def test_corrupted_frames_are_listed_skipped_and_counted(tmp_path):
    root = make_synthetic_mars(tmp_path/"m", SMALL)
    frames = sorted(root.glob("bbox_train/*/*.jpg"))
    cut, empty, text = frames[5], frames[40], frames[77]
    cut.write_bytes(cut.read_bytes()[:200]); empty.write_bytes(b""); text.write_text("this is not a JPEG")
    r = subprocess.run([sys.executable, "-m", "stmn.check", str(root), "--dataset", "mars", "--no-cache"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    for f, why in ((cut, "truncated"), (empty, "zero-byte"), (text, "not an image")): assert f"frame: {f}: {why}" in r.stdout
    assert "3 bad frame(s)" in r.stdout
    with pytest.raises(BadImageError, match="3 unreadable"): load_dataset("mars", root, verify="decode")
    ds = load_dataset("mars", root, verify="decode", bad_images="skip")
    assert ds.dropped["unreadable images (skipped)"] == 3
    whole = read_mars(root)
    for t_before, t_after in zip(whole.train, ds.train):             # each bad frame left its own tracklet; nothing substituted
        assert set(t_after.frames) == set(t_before.frames) - {str(cut), str(empty), str(text)} and t_after.pid == t_before.pid


def test_bad_layouts_are_named(tmp_path):
    root = make_synthetic_mars(tmp_path/"exp_7_c3"/"mars", SMALL)        # a root path that looks like a camera: ignored
    ds = read_mars(root)
    assert {t.camid for t in ds.train} <= set(range(1, 7)) and {t.camid for t in ds.train} != {3}
    with pytest.raises(DatasetLayoutError, match="expected the MARS layout"): load_dataset("mars", tmp_path/"empty_dir_missing")
    (tmp_path/"empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="missing folder .*empty/bbox_train"): load_dataset("mars", tmp_path/"empty")
    names = (root/"info/train_name.txt").read_text().splitlines(); names[2] = "garbage_name.jpg"
    (root/"info/train_name.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(DatasetLayoutError, match="names disagree, e.g. garbage_name.jpg"): read_mars(root)
    r = subprocess.run([sys.executable, "-m", "stmn.check", str(root), "--dataset", "mars"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "layout: info/tracks_train_info.mat row 1" in r.stdout
    (root/"info/query_IDX.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="query_IDX.mat"): read_mars(root)
    import shutil; shutil.rmtree(root/"bbox_train")
    with pytest.raises(DatasetLayoutError, match="bbox_train"): read_mars(root)


def test_sampler_edges():
    few = PKSampler([1, 2, 2, 3, 3, 3], P=3, K=4, seed=0)                 # identity 1 has one tracklet, K = 4
    b = few.batches(0)
    assert len(b) == 1 and len(b[0]) == 12 and [i for i, _ in b[0]].count(0) in (0, 4)   # full P×K, drawn with replacement
    with pytest.raises(ValueError, match="P=4 identities per batch, but the training set has only 3"): PKSampler([1, 2, 3], P=4, K=2)
    with pytest.raises(ValueError, match="P=2 identities per batch, but the training set has only 1"): PKSampler([7], P=2, K=2)
    with pytest.raises(ValueError, match="K=0"): PKSampler([1, 2], P=1, K=0)


def test_no_network_at_run_time(data, tmp_path, monkeypatch):
    def refuse(*a, **k): raise AssertionError("network use")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    p = RunConfig(**dict(P, epochs=1, workers=0))
    Learner(build_model(p, 6), read_mars(data).train, p, tmp_path).fit(1, progress=False)   # pretrained=False: no network
    import torchvision
    def offline(self, *a, **k): raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    from stmn.encoder import load_backbone
    with pytest.raises(RuntimeError, match=r"Put https://.*resnet50.* at .*checkpoints"): load_backbone("resnet50", True)


def test_concurrent_generation_of_one_synthetic_dataset(tmp_path):
    "Runs started together (a sweep's first runs) each generate the missing dataset; one wins, the others keep it."
    code = (f"from stmn.synth import make_synthetic_mars, SynthConfig; make_synthetic_mars({str(tmp_path / 's')!r}, "
            "SynthConfig(n_train_ids=4, n_test_ids=2, n_distractor_tracklets=1, n_junk_tracklets=1, max_frames=10))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert (tmp_path / "s/synth_masks.npz").is_file() and not [f for f in tmp_path.iterdir() if f.name.startswith(".s-")]
