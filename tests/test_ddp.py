"""DDP on the CPU: the two-process gloo run is nbs/08c_distributed.ipynb's demonstration; here, what the CPU refuses."""
import pytest
from stmn.base import Tracklet
from stmn.learner import Learner
from stmn.recipes import build_model, resolve_params


def test_sync_bn_refuses_the_cpu(tmp_path):
    p = resolve_params(dict(dataset="synth", model="stmn", M=3, N=2, alpha=.3, L=4, seed=0, P=2, K=2, sync_bn=True))
    with pytest.raises(ValueError, match="sync_bn=True: SyncBatchNorm needs CUDA"):
        Learner(build_model(p, 2), [Tracklet(("x",), 1, 1), Tracklet(("y",), 2, 1)], p, tmp_path)
