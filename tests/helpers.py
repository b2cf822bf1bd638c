"""What several test modules share: the one tiny run configuration (`TINY`, `tiny`) and the seeded weights of the
authors'-model fixture (`seeded_tensor`). Test code, not part of the `stmn` package.

pytest puts this folder on `sys.path` (the test modules are not a package), so a test imports `from helpers import …`;
tests/make_authors_fixture.py, run as a script from this folder, does the same, and nbs/06_model.ipynb adds
`../tests` to its path to show the fill rule on the fixture.
"""
from __future__ import annotations
import json, zlib
from pathlib import Path
import numpy as np
import torch

# The smallest run that exercises every part of STMN on the CPU in seconds: fields of `stmn.recipes.RunConfig`
# (the train notebook's parameters), so the same dict configures an in-process `Learner` and a papermill run.
TINY = dict(
    dataset="synth", model="stmn",
    backbone="resnet10", pretrained=False,   # the smallest trunk the encoder offers; nothing downloaded
    height=32, width=16,                     # 2 × 1 feature-map locations at stride 16: the spatial memory still addresses > 1 location
    L=4,                                     # frames per clip; a multiple of 4, so model="ste_nvan" accepts it too
    M=3, N=2, alpha=.3,                      # memories smaller than the paper's 10 and 5; the paper's margin
    P=4, K=2,                                # 8 clips per step; K = 2 gives every anchor a positive
    epochs=1, seed=0,
    test_sampling="rrs",                     # one clip per tracklet at evaluation
    device="cpu", workers=0,                 # no loader processes: the tests share two cores
)


def tiny(**changes):
    "`TINY` with `changes` as a `RunConfig` (validated at construction, like every run's)."
    from stmn.recipes import RunConfig
    return RunConfig(**{**TINY, **changes})


def seeded_tensor(name: str, shape) -> torch.Tensor:
    "A deterministic tensor of `shape` for parameter `name` (authors' naming), by the fill rule of nbs/06_model.ipynb."
    rng, shape = np.random.default_rng(zlib.crc32(name.encode())), tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked": return torch.zeros(shape, dtype=torch.long)
    if name.endswith("tmem.val"): x = rng.random(shape)
    elif name.endswith(("mem.key", "smem.val")): x = rng.standard_normal(shape)
    elif leaf == "running_var" or (leaf == "weight" and len(shape) == 1): x = .5 + rng.random(shape)
    elif leaf.startswith(("bias", "running_mean")): x = .1 * rng.standard_normal(shape)
    else: x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))    # conv / linear / LSTM weights
    return torch.from_numpy(x.astype(np.float32))


def run_train(root, out_dir, **params) -> dict:
    "Run nbs/train.ipynb with `TINY` and `params` into `out_dir` (its executed copy beside it); the run's metrics.json."
    import papermill as pm
    out = Path(out_dir).parent/f"{Path(out_dir).name}.ipynb"
    pm.execute_notebook(str(Path(root)/"nbs/train.ipynb"), str(out), parameters=dict(TINY, out_dir=str(out_dir), **params),
                        cwd=str(root), progress_bar=False)
    return json.loads((Path(out_dir)/"metrics.json").read_text())


TRAINED_EPOCHS = 2        # the shared run: enough to beat its initialisation (tests/test_e2e.py), a minute on one core
