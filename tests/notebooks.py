"""Execute the notebooks in fresh Jupyter kernels and keep, or check, the outputs the component notebooks store.

    python tests/notebooks.py store [NB ...]   # execute the component notebooks, write their outputs into them, nbdev_clean
    python tests/notebooks.py check [NB ...]   # execute every notebook; a component notebook's outputs must match what it stores
    python tests/notebooks.py check --dispatch second [NB ...]   # the same under another CPU instruction set (see below)
    python tests/notebooks.py check --fast --in-process   # the component notebooks less the two-process one, each in a
                                               # fork of a worker that imported PyTorch once (`make test-fast`)
    python tests/notebooks.py machine [NB ...] # only the static check: no stored output may name this machine

Execution is Jupyter's own (nbclient, the kernel named in the notebook: what JupyterLab and papermill run); which cells
run is nbdev's (`tst_flags` in settings.ini: `#| slow`, `#| gpu` and `#| eval: false` cells are skipped, as `nbdev_test`
skips them), so `check` is `nbdev_test` that also compares outputs, and `make test` executes each notebook once.
`--in-process` (the edit loop's) runs each notebook through IPython's shell as `nbdev_test` does, in a child forked from
a worker that imported PyTorch, torchvision and stmn once: a kernel spends about 6 s on that before the first cell.

What is compared: stdout, text/plain and text/markdown outputs after sanitising times, absolute paths, memory addresses
and timestamps; images by presence; stderr (warnings) is stored but not compared, and progress bars are not stored.
Numbers follow one declared tolerance per kind of output (`TOLERANCES`), never a per-cell one.

Nothing stored may depend on the machine: `check` and `store` first scan the stored outputs for this machine's identity
(`machine_identity`: CPU model, instruction set, host, user, home, checkout and temporary folders) and for dates, and
fail naming the cell. `--dispatch second` runs the numeric notebooks (`DISPATCH_SENSITIVE`) with PyTorch's CPU kernels
and oneDNN held to another instruction set (`second_dispatch`), so an output that only holds for one CPU fails here.
"""
from __future__ import annotations
import argparse, concurrent.futures, configparser, getpass, importlib, json, math, multiprocessing, os, re, socket, subprocess, sys, tempfile, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
STORED = re.compile(r"^(\d\d[a-z]?_.*|index)\.ipynb$")     # component notebooks (and the home page) store outputs
VARY_TAG = "outputs-vary"
SLOWEST_FIRST = ("08b_learner", "07_evaluation", "08c_distributed", "01_synth", "09b_executors")   # started first: the run ends sooner
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
FAST_LEAVES_OUT = ("08c_distributed",)                    # torchrun with two processes: `make test` runs it, `make test-fast` not

# ---- tolerances: one per kind of output, each with its reason ----------------------------------------------------
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24           # u: a float32 operation's largest relative rounding error
WIDEST_REDUCTION = 3 * 3 * 512               # terms in the widest sum a printed number passes through (3x3 conv, 512 channels)
LAYERS_MARGIN = 4                            # the few layers between that sum and a printed number each add as much again
TOLERANCES = {
    # Counts, shapes, names, flags, rank positions: no kernel can change them.
    "exact": dict(relative=0.0, absolute=0.0),
    # A number computed in float32: another instruction set sums in another order. A sum of n terms reordered moves by at
    # most n·u relative (for terms of one sign): 4608 · 2^-24 = 2.7e-4, times the layers margin ≈ 1.1e-3, so 1e-3; a
    # printed number may also move one unit of its last digit (a value at a rounding boundary), and a value that is
    # itself a cancellation (near 0) by 1e-6 absolute, about 8 float32 epsilons of terms of size 1.
    "fp32": dict(relative=1e-3, absolute=1e-6, last_digit=True),
    # A short training run (cells tagged `outputs-vary`): SGD amplifies the first ulp of difference into other weights
    # within a few steps, so its numbers are not compared here; the text around them is. A training result's spread is
    # the seed band (`make compare`), not a tolerance.
    "trained": None,
}
assert WIDEST_REDUCTION * FLOAT32_UNIT_ROUNDOFF * LAYERS_MARGIN <= TOLERANCES["fp32"]["relative"] * 1.2
DECIMAL_SLACK = 1 + 1e-9                     # a decimal string read into a float64 may land one ulp outside

# ---- what a notebook may not store ---------------------------------------------------------------------------------
GENERIC_ACCOUNTS = {"root", "user", "jovyan", "runner", "ubuntu"}      # shared account names, words of ordinary text too
DATE = re.compile(r"\b(19|20)\d\d-[01]\d-[0-3]\d\b")


def machine_identity() -> dict[str, str]:
    "Strings that name this machine or this checkout: {string: what it is}. None of them may appear in a stored output."
    from stmn.base import cpu_name, cpu_vector_isa                      # not stmn.speed: no torch import for a text scan
    found = {cpu_name().removesuffix(" (CPU)"): "the CPU model", cpu_vector_isa(): "the CPU's instruction set",
             cpu_vector_isa().partition("+")[0]: "the CPU's instruction set",
             socket.gethostname(): "the host name", str(Path.home()): "the home folder", str(ROOT): "the checkout's path",
             os.path.realpath(tempfile.gettempdir()): "the temporary folder", tempfile.gettempdir(): "the temporary folder"}
    user = getpass.getuser()
    if user not in GENERIC_ACCOUNTS: found[user] = "the user name"
    return {k: v for k, v in found.items() if k and len(k) >= 4 and k not in ("cpu", "default", "/")}


def machine_dependent(nb, name: str, identity: dict[str, str] | None = None) -> list[str]:
    "Messages naming each cell whose stored outputs contain a string of `machine_identity()` or a date."
    identity = machine_identity() if identity is None else identity
    patterns = [(re.compile(rf"(?<![\w/]){re.escape(k)}(?!\w)", re.I), what) for k, what in identity.items()]
    messages = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code": continue
        text = "\n".join(_text(o.get("text", "")) + "".join(_text(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
                         for o in cell.get("outputs", []))
        hits = [f"{what} {m.group(0)!r}" for pattern, what in patterns for m in [pattern.search(text)] if m]
        if DATE.search(text): hits.append(f"a date {DATE.search(text).group(0)!r}")
        if hits: messages.append(f"{name}, cell {index} ({first_line(cell)}): the stored output names this machine: "
                                 f"{', '.join(hits)}; print it without storing it, or print what does not depend on it")
    return messages


def stores_outputs(path: Path) -> bool:
    "Whether the notebook at `path` is committed with its outputs (component notebooks `00_*`-`12_*` and `index`)."
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


PRELOAD = ("torch", "torchvision", "matplotlib.pyplot", "pandas", "IPython", "execnb.shell", "stmn.learner", "stmn.evaluation",
           "stmn.analysis")                 # what nearly every component notebook imports: about 6 s a kernel spends before cell 1


KERNEL_PANDAS_COLUMNS = 20       # pandas' display.max_columns in a Jupyter kernel; outside one it is 0, "fit the terminal"


def preload(threads: int = 0):
    "A worker's initialiser for `--in-process`: the thread count, then `PRELOAD` imported once (no tensor op, so no thread pool yet)."
    if threads: os.environ["OMP_NUM_THREADS"] = str(threads)
    for name in PRELOAD: importlib.import_module(name)


def execute_in_process(path: Path, flags: set[str] | None = None):
    """`execute`, in a child forked from this (preloaded) process, through IPython's shell (execnb's `CaptureShell`, what
    `nbdev_test` runs) instead of a Jupyter kernel: the same cells and outputs without a kernel's start and imports."""
    path = Path(path); flags = skip_flags() if flags is None else flags
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                                           # the child: run, send the notebook back, exit
        os.close(read)
        try:
            from execnb.shell import CaptureShell
            import pandas
            pandas.set_option("display.max_columns", KERNEL_PANDAS_COLUMNS)
            os.chdir(path.parent)
            nb, error, shell = nbformat.read(path, as_version=4), None, CaptureShell()
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code": continue
                cell.outputs, cell.execution_count = [], None
                if skipped(cell, flags): continue
                cell.outputs = [nbformat.from_dict(o) for o in shell.run(cell.source)]
                if shell.exc is not None:
                    error = f"{path.name}, cell {index} ({first_line(cell)}):\n{type(shell.exc).__name__}: {shell.exc}"; break
            message = json.dumps(dict(nb=nb, error=error))
        except BaseException as e: message = json.dumps(dict(nb=None, error=f"{path.name}: {type(e).__name__}: {e}"))
        with os.fdopen(write, "w") as f: f.write(message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f: message = f.read()
    _, status = os.waitpid(pid, 0)
    if not message: return None, f"{path.name}: the process executing it died (status {status})"
    result = json.loads(message)
    return (nbformat.from_dict(result["nb"]) if result["nb"] else None), result["error"]


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
    # A cell's stdout as one text, first: a kernel may split one print into several streams, and where a print falls
    # between two displays depends on the executor (a kernel's message order, IPython's shell capturing), not on the code.
    stdout = "".join(text for kind, text in items if kind == "stdout")
    return ([("stdout", stdout)] if stdout else []) + [(kind, text) for kind, text in items if kind != "stdout"]


def _text(t) -> str: return "".join(t) if isinstance(t, list) else t


def numbers_close(stored: str, fresh: str) -> bool:
    "Two printed numbers agree: integers by `TOLERANCES['exact']`, decimals by `TOLERANCES['fp32']`."
    a, b = float(stored), float(fresh)
    if math.isnan(a) or math.isnan(b): return math.isnan(a) and math.isnan(b)
    if not re.search(r"[.eE]", stored + fresh): return a == b                 # "exact": an integer is a count
    tol = TOLERANCES["fp32"]
    mantissa, _, exponent = stored.lower().partition("e")
    places = len(mantissa.partition(".")[2]) - (int(exponent) if exponent else 0)
    last_digit = 10.0 ** -places if tol["last_digit"] else 0.0
    return abs(a - b) <= max(last_digit, tol["relative"] * max(abs(a), abs(b)), tol["absolute"]) * DECIMAL_SLACK


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
        numbers = TOLERANCES["trained" if VARY_TAG in new.metadata.get("tags", []) else "fp32"] is not None
        for (kind, old_text), (_, new_text) in zip(a, b):
            if not texts_match(old_text, new_text, numbers):
                messages.append(f"{where}: {kind} differs, {first_difference(old_text, new_text)}"); break
    return messages


# ---- a second instruction set ---------------------------------------------------------------------------------------
DISPATCH_SENSITIVE = ("03_encoder", "04_memory", "05_losses", "06_model", "06a_ste_nvan", "07_evaluation", "07a_reranking",
                      "08b_learner", "08d_speed", "10_analysis", "12_search")     # their printed numbers come from PyTorch's CPU kernels


def second_dispatch() -> dict[str, str]:
    "Environment holding PyTorch's CPU kernels and oneDNN to another instruction set than this run's: AVX2 under AVX-512, else SSE."
    from stmn.speed import cpu_dispatch
    if cpu_dispatch().startswith("avx512"): return dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    return dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")


# ---- store and check ----------------------------------------------------------------------------------------------
def store(path: Path, fresh_nb) -> None:
    "Write the outputs of `fresh_nb` into the notebook at `path` (atomically), then normalise it with nbdev_clean."
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    fresh = [c for c in fresh_nb.cells if c.cell_type == "code"]
    assert [c.source for c in code] == [c.source for c in fresh], f"{path}: the notebook changed while it was executed"
    for cell, new in zip(code, fresh): cell.outputs = [o for o in new.outputs if not is_progress_bar(o)]
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".ipynb", delete=False, encoding="utf-8") as f:
        nbformat.write(nb, f)
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", f.name], check=True, cwd=ROOT)
    os.chmod(f.name, path.stat().st_mode); os.replace(f.name, path)


PROGRESS_BAR = re.compile(r"\r|\d(?:it/s|s/it)\b")                     # tqdm's redraws and rates


def is_progress_bar(output) -> bool:
    "Whether `output` is a progress bar on stderr (its rates and times are the machine's: never stored)."
    return output.get("output_type") == "stream" and output.get("name") == "stderr" and bool(PROGRESS_BAR.search(_text(output["text"])))


def run_one(path: str, mode: str, threads: int = 0, env: dict | None = None, in_process: bool = False) -> tuple[str, list[str], float, bool]:
    "Execute one notebook; `store`: write its outputs, `check`: compare them. Returns (name, problems, seconds, crashed)."
    path, start = Path(path), time.time()
    if threads: os.environ["OMP_NUM_THREADS"] = str(threads)              # the kernel inherits it: no oversubscription
    os.environ.update(env or {})
    fresh, error = execute_in_process(path) if in_process else execute(path)
    if error: return path.name, [error], time.time() - start, True
    problems = []
    if stores_outputs(path):
        if mode == "store":
            store(path, fresh); problems = machine_dependent(nbformat.read(path, as_version=4), path.name)
        else: problems = stale_cells(nbformat.read(path, as_version=4), fresh, path.name)
    return path.name, problems, time.time() - start, False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("store", "check", "machine"))
    parser.add_argument("notebooks", nargs="*", help="notebooks (default: every notebook in nbs/; store: the component ones; "
                                                     "--dispatch second: the numeric ones)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="only the notebooks that store outputs (00_*-12_*, index), "
                                                            f"less {', '.join(FAST_LEAVES_OUT)} (`make test-fast`)")
    parser.add_argument("--in-process", action="store_true",
                        help="check only: run each notebook in a fork of a worker that imported PyTorch and stmn once, through "
                             "IPython's shell instead of a Jupyter kernel (`make test-fast`; `make test` uses kernels)")
    parser.add_argument("--dispatch", choices=("native", "second"), default="native",
                        help="second: PyTorch's and oneDNN's CPU kernels held to another instruction set (see second_dispatch)")
    args = parser.parse_args(argv)
    default = sorted(NBS.glob("*.ipynb"))
    if args.dispatch == "second": default = [p for p in default if p.stem in DISPATCH_SENSITIVE]
    paths = [Path(p).resolve() for p in args.notebooks] or default
    if args.mode == "store" or args.fast: paths = [p for p in paths if stores_outputs(p)]
    if args.fast: paths = [p for p in paths if p.stem not in FAST_LEAVES_OUT]
    for p in paths:
        if not p.exists(): parser.error(f"no notebook {p}")
    if args.in_process and (args.mode != "check" or args.dispatch != "native"):
        parser.error("--in-process checks under the native dispatch only (the dispatch must be set before PyTorch is imported)")
    env = second_dispatch() if args.dispatch == "second" else {}
    if env: print("dispatch: " + " ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if args.mode in ("check", "machine"):                                  # static: before anything runs
        named = [m for p in paths if stores_outputs(p) for m in machine_dependent(nbformat.read(p, as_version=4), p.name)]
        if named or args.mode == "machine":
            print("\n".join(named) or f"{len(paths)} notebooks: no stored output names this machine", file=sys.stderr if named else sys.stdout)
            if named: return 1
            return 0
    paths.sort(key=lambda p: (p.stem not in SLOWEST_FIRST, SLOWEST_FIRST.index(p.stem) if p.stem in SLOWEST_FIRST else 0))
    from stmn.recipes import allocated_cpus                             # the affinity mask, capped by SLURM_CPUS_PER_TASK
    threads = max(1, allocated_cpus() // args.workers) if args.workers > 1 else 0
    problems, stale, start = [], False, time.time()
    warm = dict(initializer=preload, initargs=(threads,)) if args.in_process else {}
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork"), **warm) as pool:
        jobs = [pool.submit(run_one, str(p), args.mode, threads, env, args.in_process) for p in paths]
        for job in concurrent.futures.as_completed(jobs):
            name, found, seconds, crashed = job.result()
            print(f"{'FAIL' if found else 'ok  '} {name:<24} {seconds:5.0f} s", flush=True)
            problems += found; stale |= bool(found) and not crashed
    print(f"{len(paths)} notebooks in {time.time() - start:.0f} s ({args.mode}{', ' + ' '.join(env.values()) if env else ''}).")
    if problems:
        print("\n" + "\n".join(problems), file=sys.stderr)
        if args.mode == "check" and stale:
            print("\nStored outputs are stale: run `make outputs` and commit the notebooks.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__": sys.exit(main())
