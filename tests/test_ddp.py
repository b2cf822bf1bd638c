"""One run in two processes: torchrun with the gloo backend on the CPU."""
import json
import pytest
import torch
from stmn.learner import load_model, resolve_params


def test_two_gloo_processes_train_a_few_steps(tmp_path, data_home):
    from stmn.ddp import launch
    p = resolve_params(dict(dataset="synth", data_root="", synth_seed=0, protocol="", split=0, trial=0, model="stmn", M=3, N=2,
                            alpha=.3, L=4, seed=0, backbone="resnet10", pretrained=False, height=32, width=16, epochs=2, P=2, K=2,
                            lr_step=1, test_sampling="rrs", ap="plain", workers=0, device="cpu", resume="auto", out_dir=str(tmp_path/"run")))
    m = launch(p, nproc=2, timeout=600)
    steps = [json.loads((tmp_path/f"run/steps_rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0]["steps_per_epoch"] == steps[1]["steps_per_epoch"] == 24 // (2 * 2) and steps[0]["epochs"] == steps[1]["epochs"] == 2
    assert m["world_size"] == 2 and m["n_query"] > 0 and len(m["history"]) == 2
    assert len(list((tmp_path/"run").glob("metrics*.json"))) == 1                 # written once, by rank 0
    model, params = load_model(tmp_path/"run/checkpoint.pt")                        # loads in a single process
    assert params["M"] == 3 and not any(k.startswith("module.") for k in model.state_dict())


def test_sync_bn_refuses_the_cpu(tmp_path):
    from stmn.learner import Learner, build_model
    p = resolve_params(dict(dataset="synth", model="stmn", M=3, N=2, alpha=.3, L=4, seed=0, P=2, K=2, sync_bn=True))
    from stmn.data import Tracklet
    with pytest.raises(ValueError, match="sync_bn=True: SyncBatchNorm needs CUDA"):
        Learner(build_model(p, 2), [Tracklet(("x",), 1, 1), Tracklet(("y",), 2, 1)], p, tmp_path)
