"""The component notebooks are committed executed, and `tests/notebooks.py check` (in `make test`) catches stale outputs."""
from __future__ import annotations
import json, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest

from notebooks import (NBS, ROOT, comparable, machine_dependent, machine_identity, numbers_close, sanitise, second_dispatch,
                       stale_cells, stores_outputs, texts_match, is_progress_bar)


def test_sanitise_times_paths_addresses():
    assert sanitise("done in 12.5 s at <object at 0x7f3a2b1c4d90> -> /tmp/tmpab12/metrics.json") == \
        "done in <time> at <object at 0x<address>> -> <path>"
    assert sanitise("2026-12-02 00:18:39 took 3 min, 40 ms") == "<timestamp> took <time>, <time>"
    assert sanitise("rank-1 57.4% over 3/4 of the ids; x/y") == "rank-1 57.4% over 3/4 of the ids; x/y"


def test_numbers_with_a_tolerance():
    assert numbers_close("0.1234", "0.1235") and numbers_close("57.4", "57.3")       # one unit of the last digit
    assert not numbers_close("0.1234", "0.1237") and not numbers_close("57.4", "57.6")
    assert numbers_close("0.9999998211860657", "0.9999997615814209")                  # float32 noise, full repr
    assert numbers_close("1e-8", "3e-8") and not numbers_close("0.5", "0.7")
    assert numbers_close("24", "24") and not numbers_close("24", "25")                # integers exactly
    assert texts_match("spread 0.300 → 0.021", "spread 0.300 → 0.022")
    assert not texts_match("spread 0.300 → 0.021", "spread 0.300 → 0.121")
    assert not texts_match("channel: [0.99]", "cosine: [0.99]")
    assert texts_match("loss 7.589", "loss 7.701", compare_numbers=False)


def test_comparable_outputs():
    outs = [{"output_type": "stream", "name": "stdout", "text": ["a 1.0\n"]},
            {"output_type": "stream", "name": "stdout", "text": "b\n"},
            {"output_type": "stream", "name": "stderr", "text": "warning at /x/y.py\n"},
            {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}},
            {"output_type": "execute_result", "data": {"text/plain": "tensor([1., 2.])"}, "execution_count": None}]
    assert comparable(outs) == [("stdout", "a 1.0\nb\n"), ("image", "image/png"), ("text/plain", "tensor([1., 2.])")]


def test_every_component_notebook_is_stored_with_outputs():
    "A fresh clone shows numbers (and, where the notebook draws one, a figure) without running anything."
    component = [p for p in sorted(NBS.glob("*.ipynb")) if stores_outputs(p) and p.stem != "index"]
    assert len(component) >= 20
    empty, figures = [], []
    for path in component:
        outs = [o for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        if not outs: empty.append(path.name)
        if any(m in o.get("data", {}) for o in outs for m in ("image/png", "image/jpeg")): figures.append(path.name)
    assert not empty, f"notebooks committed without outputs (make outputs): {empty}"
    assert "04_memory.ipynb" in figures and len(figures) >= len(component) // 2, figures
    for path in sorted(NBS.glob("*.ipynb")):
        if not stores_outputs(path):
            assert not any(c.get("outputs") for c in json.loads(path.read_text())["cells"]), f"{path.name}: job notebooks stay clean"


@pytest.mark.slow
def test_an_edited_notebook_fails_the_staleness_check(tmp_path):
    "Change a printed value in 04_memory without re-executing it: `check` fails and names the cell."
    copy = tmp_path / "04_memory.ipynb"
    nb = nbformat.read(NBS / "04_memory.ipynb", as_version=4)
    edited = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("D, M = 256, 10")]
    assert len(edited) == 1 and edited[0].outputs, "04_memory's sharpening cell, stored with its output"
    edited[0].source = edited[0].source.replace("D, M = 256, 10", "D, M = 256, 12")
    nbformat.write(nb, copy)
    run = subprocess.run([sys.executable, str(ROOT / "tests/notebooks.py"), "check", str(copy), "--workers", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "04_memory.ipynb, cell" in run.stderr and "'D, M = 256, 12'" in run.stderr and "stdout differs" in run.stderr
    assert "make outputs" in run.stderr


def test_stale_cells_names_the_cell():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1.5)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1.5\n")]
    fresh = nbformat.reads(nbformat.writes(nb), as_version=4)
    assert stale_cells(nb, fresh, "x.ipynb") == []
    fresh.cells[0].outputs[0].text = "2.5\n"
    assert stale_cells(nb, fresh, "x.ipynb") == ["x.ipynb, cell 0 ('print(1.5)'): stdout differs, line 1: stored '1.5', now '2.5'"]
    fresh.cells[0].metadata["tags"] = ["outputs-vary"]
    assert stale_cells(nb, fresh, "x.ipynb") == []


def stored_notebook(path, text):
    "A one-cell component notebook at `path` whose stored output is `text`."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"print({text!r})")])
    nb.metadata["kernelspec"] = {"name": "stmn", "display_name": "Python (stmn)", "language": "python"}
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=text + "\n")]
    nbformat.write(nb, str(path))
    return path


def test_a_stored_output_that_names_the_cpu_fails_the_check(tmp_path):
    "A stored output printing this machine's CPU model: `check` fails before executing anything, naming the cell and why."
    cpu = next(k for k, what in machine_identity().items() if what == "the CPU model")
    path = stored_notebook(tmp_path / "99_machine.ipynb", f"measured on {cpu} (CPU)")
    run = subprocess.run([sys.executable, str(ROOT / "tests/notebooks.py"), "check", str(path), "--workers", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "99_machine.ipynb, cell 0 (" in run.stderr and f"the CPU model {cpu!r}" in run.stderr
    assert "notebooks in" not in run.stdout                          # refused before any kernel started


def test_machine_identity_paths_dates_and_words():
    identity = {"Example CPU 9000": "the CPU model", "avx512": "the CPU's instruction set", "/tmp": "the temporary folder",
                "/home/alice": "the home folder"}
    def named(text):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
        nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text=text)]
        return machine_dependent(nb, "n.ipynb", identity)
    assert named("cannot read /tmp/tmpab12/c.pt") and named("on EXAMPLE cpu 9000") and named("isa avx512+bf16")
    assert named("written 2026-12-03") and named("/home/alice/.cache")
    assert not named("data_root and tmp/c.pt, 12 ms, avx2, /home/bob") and not named("")
    assert named("cannot read /tmp/x")[0].startswith("n.ipynb, cell 0 ('x'): the stored output names this machine: the temporary folder")


def test_no_committed_notebook_names_a_machine():
    "The static scan over every stored output, with this machine's identity (the test command runs it on every machine)."
    problems = [m for p in sorted(NBS.glob("*.ipynb")) if stores_outputs(p)
                for m in machine_dependent(nbformat.read(p, as_version=4), p.name)]
    assert problems == []


def test_progress_bars_are_not_stored():
    assert is_progress_bar({"output_type": "stream", "name": "stderr", "text": "\rtraining:  50%| 6/12 [00:05<00:05,  1.10it/s]"})
    assert not is_progress_bar({"output_type": "stream", "name": "stderr", "text": "UserWarning: x\n"})
    assert not is_progress_bar({"output_type": "stream", "name": "stdout", "text": "\r"})


def test_the_second_dispatch_is_another_instruction_set():
    "Under `second_dispatch()` PyTorch reports a lower CPU capability than in this process (AVX2 under AVX-512, else none)."
    import os, torch
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **second_dispatch()}).stdout.strip()
    assert second != torch.backends.cpu.get_cpu_capability() and second in ("AVX2", "DEFAULT"), second


@pytest.mark.parametrize("executor", [[], ["--in-process"]], ids=["kernel", "in-process"])
def test_an_edited_cell_fails_the_check(tmp_path, executor):
    """The fast version of the test above, on a one-cell notebook: code edited, output not re-stored, the check names the
    cell; in a Jupyter kernel (`make test`) and in a fork of a preloaded worker (`make test-fast`)."""
    path = stored_notebook(tmp_path / "98_edit.ipynb", "4.5")
    nb = nbformat.read(path, as_version=4); nb.cells[0].source = "print(1.5 * 4)"; nbformat.write(nb, str(path))
    run = subprocess.run([sys.executable, str(ROOT / "tests/notebooks.py"), "check", str(path), "--workers", "1", *executor],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "98_edit.ipynb, cell 0 ('print(1.5 * 4)'): stdout differs, line 1: stored '4.5', now '6.0'" in run.stderr


def test_a_failing_cell_is_named_in_process(tmp_path):
    "`--in-process`: a cell that raises stops the notebook, and the check names the cell and the error."
    path = stored_notebook(tmp_path / "98_raise.ipynb", "4.5")
    nb = nbformat.read(path, as_version=4); nb.cells[0].source = "raise ValueError('no such thing')"; nbformat.write(nb, str(path))
    run = subprocess.run([sys.executable, str(ROOT / "tests/notebooks.py"), "check", str(path), "--workers", "1", "--in-process"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "98_raise.ipynb, cell 0" in run.stderr and "ValueError: no such thing" in run.stderr, run.stderr
