"""`make gpu-check` without CUDA: the same command runs every section it can with tiny shapes on the CPU, writes its
report section by section, and names what it skipped and why."""
from __future__ import annotations
import json, os, subprocess, sys
from pathlib import Path

import torch
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run `make gpu-check` itself (8 minutes)")
@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_names_what_it_skipped(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--out", str(tmp_path)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    R = json.loads((tmp_path / "gpu.json").read_text())
    sections = R["sections"]
    assert list(sections) == ["bf16", "layouts", "resume", "evaluation", "ddp", "speed", "notebooks", "memory"]
    ran = {k: s for k, s in sections.items() if k != "ddp"}           # on the CPU the notebook's nproc-2 run is torchrun's check
    assert all(s["status"] == "passed" and s["checks"] and all(c["ok"] for c in s["checks"]) for s in ran.values()), sections
    assert sections["ddp"]["status"] == "skipped" and "nproc 2" in sections["ddp"]["reason"]
    assert any("torchrun" in c["name"] for c in sections["notebooks"]["checks"])
    assert any("need CUDA" in x for x in sections["speed"]["skipped"])                  # the CUDA-only parts are named
    assert any("figures.ipynb" in x for x in sections["notebooks"]["skipped"])
    assert R["mode"] == "tiny shapes on the CPU"
    md = (tmp_path / "gpu.md").read_text()
    assert "| bf16 autocast against fp32" in md and "skipped: " in md


def test_a_missing_wheel_folder_is_named(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    monkeypatch.setattr(gpu_check, "NOTEBOOK_PACKAGES", ("papermill", "no_such_package_here"))
    with pytest.raises(FileNotFoundError, match="make gpu-wheels"):
        gpu_check.ensure_packages(str(tmp_path / "none"))
    assert gpu_check.ensure_packages(None) == ["no_such_package_here"]      # without --wheels: reported, nothing installed
