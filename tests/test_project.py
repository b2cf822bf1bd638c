"""The project's shape: dependencies agree, README is the index notebook, modules are what the notebooks export."""
import configparser, filecmp, json, re, shutil, subprocess, sys
from pathlib import Path

BIN = Path(sys.executable).parent


def settings(root):
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(root/"settings.ini")
    return cfg["DEFAULT"]


def env_pip_list(root):
    "The pip entries of environment.yml (a plain reader: the file is a flat list under `- pip:`)."
    lines, out, inside = (root/"environment.yml").read_text().splitlines(), [], False
    for line in lines:
        s = line.strip()
        if s == "- pip:": inside = True; continue
        if inside and s.startswith("- "): out.append(s[2:].strip())
        elif inside and s and not s.startswith("#"): inside = False
    return out


def test_environment_yml_agrees_with_settings(root):
    cfg = settings(root)
    want = cfg["requirements"].split() + cfg["dev_requirements"].split()
    have = env_pip_list(root)
    assert '-e ".[dev]"' in have, "environment.yml must install the project itself"
    assert sorted(h for h in have if not h.startswith("-e")) == sorted(want)


def test_torch_requirements_are_ranges(root):
    reqs = settings(root)["requirements"].split()
    for name in ("torch", "torchvision"):
        spec = next(r for r in reqs if r.split(">")[0].split("<")[0].split("=")[0] == name)
        assert ">=" in spec and "<" in spec and "==" not in spec, spec


def test_readme_is_rendered_from_index(root):
    out = subprocess.run([str(BIN/"jupyter"), "nbconvert", "--to", "markdown", "--stdout", str(root/"nbs/index.ipynb")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == (root/"README.md").read_text().strip(), "README.md is stale: run `make readme`"


def test_exported_modules_match_notebooks(root, tmp_path):
    for name in ("nbs", "stmn"): shutil.copytree(root/name, tmp_path/name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root/"settings.ini", tmp_path)
    subprocess.run([str(BIN/"nbdev_export")], cwd=tmp_path, check=True, capture_output=True)
    mods = sorted(p.name for p in (root/"stmn").glob("*.py"))
    _, mismatch, errors = filecmp.cmpfiles(root/"stmn", tmp_path/"stmn", mods, shallow=False)
    assert not mismatch and not errors, f"stmn/ differs from what the notebooks export: {mismatch + errors}; run nbdev_export"
    assert sorted(p.name for p in (tmp_path/"stmn").glob("*.py")) == mods


def test_notebooks_name_the_project_kernel(root):
    for nb in sorted((root/"nbs").glob("*.ipynb")):
        assert json.loads(nb.read_text())["metadata"]["kernelspec"]["name"] == "stmn", nb.name


def test_train_notebook_parameters_cell(root):
    nb = json.loads((root/"nbs/train.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1
    src = "".join(cells[0]["source"])
    assert "#| export" not in src and "import" not in src
    help_ = subprocess.run([str(BIN/"papermill"), "--help-notebook", str(root/"nbs/train.ipynb")], capture_output=True, text=True).stdout
    for name in ("M", "N", "alpha", "L", "dataset", "data_root", "epochs", "P", "K", "lr", "seed", "height", "width",
                 "backbone", "pretrained", "device", "out_dir"):
        assert f"\n  {name}: " in help_, f"papermill --help-notebook does not list {name}"


def test_ci_calls_the_readme_test_command(root):
    assert "make test" in (root/".ci/run").read_text() and "make test" in (root/"README.md").read_text()


def import_graph(pkg: Path) -> dict:
    "`{module: {modules of the package it imports}}`, from every import statement (those inside functions too)."
    import ast
    mods = {p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "_modidx")}
    graph = {}
    for m in sorted(mods):
        found = set()
        for node in ast.walk(ast.parse((pkg/f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1: base = f"stmn.{base}" if base else "stmn"
                if base == "stmn": found |= {a.name for a in node.names if a.name in mods}
                elif base.startswith("stmn."): found.add(base.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stmn.")}
        graph[m] = found & mods - {m}
    return graph


def find_cycle(graph: dict) -> list | None:
    "One cycle of `graph` as a list of nodes `[a, b, …, a]`, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = "open"; stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open": return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)): return c
        state[n] = "done"; stack.pop()
    for n in sorted(graph):
        if n not in state and (c := visit(n)): return c
    return None


def test_find_cycle_names_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_one_way(root):
    graph = import_graph(root/"stmn")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(f"stmn.{m}" for m in cycle)
    assert graph["base"] == set(), f"stmn.base must import nothing of the package; it imports {sorted(graph['base'])}"
    for low in ("mars", "datasets", "check", "synth", "miniature", "data"):           # the data layer never reaches training
        assert not graph[low] & {"recipes", "checkpoints", "learner", "ddp", "speed", "sweep", "evaluation"}, (low, graph[low])


def test_train_parameters_are_run_config_fields(root):
    "train.ipynb's parameters cell is RunConfig's field lines; papermill reads the same names, types, defaults and help."
    import papermill as pm
    from stmn.recipes import parameter_disagreements, parameters_cell, recipe_disagreements
    cell = next(c for c in json.loads((root/"nbs/train.ipynb").read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert "".join(cell["source"]) == parameters_cell(), "copy stmn.recipes.parameters_cell() into train.ipynb's parameters cell"
    problems = parameter_disagreements(pm.inspect_notebook(str(root/"nbs/train.ipynb"))) + recipe_disagreements()
    assert not problems, "nbs/train.ipynb's parameters cell and stmn.recipes.RunConfig disagree:\n" + "\n".join(problems)
    help_text = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(root/"nbs/train.ipynb")],
                               capture_output=True, text=True, check=True).stdout
    from stmn.recipes import field_help
    for name, (kind, default, comment) in field_help().items():
        assert f"{name}: {kind} (default {default})" in help_text and comment in help_text, name


def test_imports_follow_the_layers_00_base_documents(root):
    "Each module imports only from its own layer or those below, as the table at the top of nbs/00_base.ipynb says."
    import re
    first = "".join(json.loads((root/"nbs/00_base.ipynb").read_text())["cells"][0]["source"])
    rows = [l for l in first.split("| layer | modules |", 1)[1].splitlines()[2:] if l.startswith("|")]
    layer = {m: i for i, row in enumerate(rows) for m in re.findall(r"`(\w+)`", row.split("|")[2])}
    graph = import_graph(root/"stmn")
    assert set(graph) <= set(layer), f"modules missing from 00_base's layer table: {sorted(set(graph) - set(layer))}"
    up = [f"stmn.{a} (layer {layer[a]}) imports stmn.{b} (layer {layer[b]})" for a in graph for b in graph[a] if layer[b] > layer[a]]
    assert not up, "imports that run upwards:\n" + "\n".join(up)


DOCUMENT_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*(?:[A-Z][A-Z_]+\.md|\d\d[a-z]?_\w+\.ipynb))")   # README.md, nbs/04_memory.ipynb
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")                                              # [text](target)


def named_documents(path: Path, text: str) -> list[tuple[str, Path]]:
    "The documents `text` (the file at `path`) names: (as written, where it must be) for each upper-case Markdown name, numbered notebook and relative link."
    out = []
    for name in DOCUMENT_NAME.findall(text):
        if not (path.parts[0] == "tests" and name.endswith(".ipynb")):      # the tests write their own numbered notebooks
            out.append((name, Path(name)))                                        # checked by file name below: cited from anywhere
    cells = json.loads(text)["cells"] if path.suffix == ".ipynb" else [dict(cell_type="markdown", source=text)]
    base = Path(".") if path.name == "index.ipynb" else path.parent          # index.ipynb is README.md, read from the top
    for cell in cells:
        if cell["cell_type"] == "markdown" and path.suffix in (".md", ".ipynb"):
            for target in MARKDOWN_LINK.findall("".join(cell["source"])):
                if "://" not in target and not target.startswith("mailto:"): out.append((target, base/target))
    return out


def test_no_file_names_a_document_it_does_not_hold(root):
    """Every document a tracked file names is in the repository: a reader who clones it can follow each reference.
    Upper-case Markdown names and numbered notebooks are found by file name (a docstring cites the decisions page
    by section from any folder); a markdown link must resolve from its file's folder. Outputs a command writes (runs/,
    tables/) are lower-case names and not checked, nor the notebooks the tests write; the authors' files cited by
    path (`run_NL.sh`) live in their repositories, which the citing text names."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split()     # what a commit of the tree holds
    names = {Path(f).name for f in tracked}
    missing = []
    for f in tracked:
        if Path(f).suffix not in (".md", ".ipynb", ".py", ".ini", ".yml", ".sh", ".txt") and Path(f).name not in ("Makefile",):
            continue
        for written, where in named_documents(Path(f), (root/f).read_text()):
            ok = where.name in names if where == Path(written) and DOCUMENT_NAME.fullmatch(written) else (root/where).exists()
            if not ok: missing.append(f"{f}: names {written}, which the repository does not hold")
    assert not missing, "\n".join(sorted(set(missing)))


def test_search_notebook_parameters_are_search_config_fields(root):
    "nbs/search.ipynb's parameters cell is SearchConfig's field lines, so papermill and `python -m stmn.search` take the same."
    from stmn.recipes import parameters_cell, field_help
    from stmn.search import SearchConfig
    import papermill as pm
    nb = json.loads((root/"nbs/search.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1 and "".join(cells[0]["source"]) == parameters_cell(SearchConfig), "copy parameters_cell(SearchConfig) into the cell"
    declared = pm.inspect_notebook(str(root/"nbs/search.ipynb"))
    assert {k: (v["inferred_type_name"], v["help"]) for k, v in declared.items()} == {k: (t, h) for k, (t, _, h) in field_help(SearchConfig).items()}
