"""Execute the notebooks in fresh Jupyter kernels and keep, or check, the outputs the component notebooks store.

    python tests/notebooks.py store [NB ...]   # execute the component notebooks, write their outputs into them, nbdev_clean
    python tests/notebooks.py check [NB ...]   # execute every notebook; a component notebook's outputs must match what it stores

Execution is Jupyter's own (nbclient, the kernel named in the notebook: what JupyterLab and papermill run); which cells
run is nbdev's (`tst_flags` in settings.ini: `#| slow`, `#| gpu` and `#| eval: false` cells are skipped, as `nbdev_test`
skips them), so `check` is `nbdev_test` that also compares outputs, and `make test` executes each notebook once.
Comparison: stdout, text/plain and text/markdown outputs after sanitising times, absolute paths, memory addresses and
timestamps; numbers with a tolerance (integers exact, decimals within one unit of the last printed digit or 1e-3
relative); images by presence; stderr (warnings, progress bars) is stored but not compared. A cell tagged
`outputs-vary` (a short training run whose numbers depend on the CPU's kernels) is compared without its numbers.
"""
from __future__ import annotations
import argparse, concurrent.futures, configparser, math, os, re, subprocess, sys, tempfile, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
STORED = re.compile(r"^(\d\d[a-z]?_.*|index)\.ipynb$")     # component notebooks (and the home page) store outputs
VARY_TAG = "outputs-vary"
SLOWEST_FIRST = ("08b_learner", "07_evaluation", "08c_distributed", "01_synth")   # started first: the run ends sooner
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")


def stores_outputs(path: Path) -> bool:
    "Whether the notebook at `path` is committed with its outputs (component notebooks `00_*`-`10_*` and `index`)."
    return bool(STORED.match(Path(path).name))


def skip_flags() -> set[str]:
    "nbdev's test flags (`tst_flags` in settings.ini): cells marked with one are not executed."
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def skipped(cell, flags: set[str]) -> bool:
    "Whether nbdev_test would skip this code cell (a skip flag, `#| eval: false`, or the `nbdev_export()` call)."
    from nbdev.process import extract_directives
    if "nbdev_export" + "(" in cell.source: return True
    directives = extract_directives(cell, remove=False)
    if directives.get("eval:", [""])[0].lower() == "false": return True
    return bool(flags & directives.keys())


def execute(path: Path, flags: set[str] | None = None, timeout: int = 900):
    "Execute the notebook at `path` top to bottom in a fresh kernel; returns (notebook with outputs, error or None)."
    path = Path(path); flags = skip_flags() if flags is None else flags
    nb = nbformat.read(path, as_version=4)
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])      # not the kernel's TCP notice each time
    error = None
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code": continue
            cell.outputs, cell.execution_count = [], None
            if skipped(cell, flags): continue
            try: client.execute_cell(cell, index)
            except CellExecutionError as e:
                error = f"{path.name}, cell {index} ({first_line(cell)}):\n{e}"; break
    return nb, error


def first_line(cell) -> str:
    "The cell's first line of code, to name it in a message."
    lines = [l for l in cell.source.splitlines() if l.strip() and not l.startswith("#|")]
    return repr(lines[0][:70]) if lines else "empty cell"


# ---- comparison -------------------------------------------------------------------------------------------------
SANITISERS = [                                                             # (pattern, replacement), applied in order
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d+)?)?"), "<timestamp>"),
    (re.compile(r"0x[0-9a-fA-F]{6,}"), "0x<address>"),
    (re.compile(r"(?<![\w.~])/(?:[\w.@+-]+/)+[\w.@+-]*"), "<path>"),      # absolute paths (a tmp dir, the checkout)
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us|ns|s|sec|secs|seconds|min|minutes)\b"), "<time>"),
]
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def sanitise(text: str) -> str:
    "`text` with times, absolute paths, memory addresses and timestamps replaced by placeholders."
    for pattern, replacement in SANITISERS: text = pattern.sub(replacement, text)
    return text


def comparable(outputs) -> list[tuple[str, str]]:
    "The outputs of one cell as (kind, sanitised text): stdout, text/plain, text/markdown, errors; images as their mime."
    items = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream" and out.get("name") == "stdout": items.append(("stdout", sanitise(_text(out["text"]))))
        elif kind == "error": items.append(("error", f"{out['ename']}: {out['evalue']}"))
        elif kind in ("display_data", "execute_result"):
            data = out.get("data", {})
            images = [m for m in IMAGE_MIMES if m in data]
            if images: items.append(("image", images[0]))
            elif "text/markdown" in data: items.append(("text/markdown", sanitise(_text(data["text/markdown"]))))
            elif "text/plain" in data: items.append(("text/plain", sanitise(_text(data["text/plain"]))))
    merged = []                                                            # a kernel may split one print into several streams
    for kind, text in items:
        if merged and kind == "stdout" and merged[-1][0] == "stdout": merged[-1] = ("stdout", merged[-1][1] + text)
        else: merged.append((kind, text))
    return merged


def _text(t) -> str: return "".join(t) if isinstance(t, list) else t


def numbers_close(stored: str, fresh: str) -> bool:
    "Two printed numbers agree: integers exactly; decimals within one unit of the stored last digit or 1e-3 relative."
    a, b = float(stored), float(fresh)
    if math.isnan(a) or math.isnan(b): return math.isnan(a) and math.isnan(b)
    if not re.search(r"[.eE]", stored + fresh): return a == b
    mantissa, _, exponent = stored.lower().partition("e")
    places = len(mantissa.partition(".")[2]) - (int(exponent) if exponent else 0)
    return abs(a - b) <= max(10.0 ** -places, 1e-3 * max(abs(a), abs(b)), 1e-6) * (1 + 1e-9)


def texts_match(stored: str, fresh: str, compare_numbers: bool = True) -> bool:
    "Same text with numbers replaced by a placeholder, and (if `compare_numbers`) every number close (`numbers_close`)."
    if NUMBER.sub("#", stored) != NUMBER.sub("#", fresh): return False
    if not compare_numbers: return True
    return all(numbers_close(a, b) for a, b in zip(NUMBER.findall(stored), NUMBER.findall(fresh)))


def first_difference(stored: str, fresh: str) -> str:
    "The first line where two texts differ, both versions."
    s, f = stored.splitlines(), fresh.splitlines()
    for i in range(max(len(s), len(f))):
        a, b = (s[i] if i < len(s) else "<no line>"), (f[i] if i < len(f) else "<no line>")
        if not texts_match(a, b): return f"line {i + 1}: stored {a[:160]!r}, now {b[:160]!r}"
    return f"stored {len(s)} lines, now {len(f)}"


def stale_cells(stored_nb, fresh_nb, name: str) -> list[str]:
    "Messages naming each code cell whose fresh outputs do not match the stored ones (empty: up to date)."
    stored_cells = [c for c in stored_nb.cells if c.cell_type == "code"]
    fresh_cells = [c for c in fresh_nb.cells if c.cell_type == "code"]
    if [c.source for c in stored_cells] != [c.source for c in fresh_cells]: return [f"{name}: the code changed while executing"]
    messages = []
    index = {id(c): i for i, c in enumerate(fresh_nb.cells)}
    for old, new in zip(stored_cells, fresh_cells):
        where = f"{name}, cell {index[id(new)]} ({first_line(new)})"
        a, b = comparable(old.get("outputs", [])), comparable(new.get("outputs", []))
        if [k for k, _ in a] != [k for k, _ in b]:
            messages.append(f"{where}: stored outputs {[k for k, _ in a]}, now {[k for k, _ in b]}"); continue
        numbers = VARY_TAG not in new.metadata.get("tags", [])
        for (kind, old_text), (_, new_text) in zip(a, b):
            if not texts_match(old_text, new_text, numbers):
                messages.append(f"{where}: {kind} differs, {first_difference(old_text, new_text)}"); break
    return messages


# ---- store and check ----------------------------------------------------------------------------------------------
def store(path: Path, fresh_nb) -> None:
    "Write the outputs of `fresh_nb` into the notebook at `path` (atomically), then normalise it with nbdev_clean."
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    fresh = [c for c in fresh_nb.cells if c.cell_type == "code"]
    assert [c.source for c in code] == [c.source for c in fresh], f"{path}: the notebook changed while it was executed"
    for cell, new in zip(code, fresh): cell.outputs = new.outputs
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".ipynb", delete=False, encoding="utf-8") as f:
        nbformat.write(nb, f)
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", f.name], check=True, cwd=ROOT)
    os.chmod(f.name, path.stat().st_mode); os.replace(f.name, path)


def run_one(path: str, mode: str, threads: int = 0) -> tuple[str, list[str], float, bool]:
    "Execute one notebook; `store`: write its outputs, `check`: compare them. Returns (name, problems, seconds, crashed)."
    path, start = Path(path), time.time()
    if threads: os.environ["OMP_NUM_THREADS"] = str(threads)              # the kernel inherits it: no oversubscription
    fresh, error = execute(path)
    if error: return path.name, [error], time.time() - start, True
    problems = []
    if stores_outputs(path):
        if mode == "store": store(path, fresh)
        else: problems = stale_cells(nbformat.read(path, as_version=4), fresh, path.name)
    return path.name, problems, time.time() - start, False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("store", "check"))
    parser.add_argument("notebooks", nargs="*", help="notebooks (default: every notebook in nbs/; store: the component ones)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    paths = [Path(p).resolve() for p in args.notebooks] or sorted(NBS.glob("*.ipynb"))
    if args.mode == "store": paths = [p for p in paths if stores_outputs(p)]
    for p in paths:
        if not p.exists(): parser.error(f"no notebook {p}")
    paths.sort(key=lambda p: (p.stem not in SLOWEST_FIRST, SLOWEST_FIRST.index(p.stem) if p.stem in SLOWEST_FIRST else 0))
    from stmn.recipes import allocated_cpus                             # the affinity mask, capped by SLURM_CPUS_PER_TASK
    threads = max(1, allocated_cpus() // args.workers) if args.workers > 1 else 0
    problems, stale, start = [], False, time.time()
    with concurrent.futures.ProcessPoolExecutor(args.workers, max_tasks_per_child=1) as pool:
        jobs = [pool.submit(run_one, str(p), args.mode, threads) for p in paths]
        for job in concurrent.futures.as_completed(jobs):
            name, found, seconds, crashed = job.result()
            print(f"{'FAIL' if found else 'ok  '} {name:<24} {seconds:5.0f} s", flush=True)
            problems += found; stale |= bool(found) and not crashed
    print(f"{len(paths)} notebooks in {time.time() - start:.0f} s ({args.mode}).")
    if problems:
        print("\n" + "\n".join(problems), file=sys.stderr)
        if args.mode == "check" and stale:
            print("\nStored outputs are stale: run `make outputs` and commit the notebooks.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__": sys.exit(main())
