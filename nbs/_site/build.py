"""Build the companion site from the notebooks (`make docs` -> `_docs/index.html`), offline and without Quarto.

1. nbdev's own document processors (those `nbdev_docs` gives Quarto) prepare each notebook: `#| hide` cells removed,
   a `show_doc` cell (signature and docstring) after each exported name, rendered here from the installed module.
   Two are left out: `rm_export`, so the exported code stays on the page, and `exec_show_docs`, which would execute
   every cell that imports something (slow ones too) in a fresh namespace.
2. JupyterLab's nbconvert template ("lab") renders each processed notebook, outputs included, with a sidebar in the
   paper's order (`page.html.j2`); MathJax 3 is served from the site (from the `sphinx-mathjax-offline` package), so a
   page fetches nothing from the network.
3. Every relative link is checked: it names a page of the site or a file of the repository, which is copied in.
Users who have Quarto keep `nbdev_docs`.
"""
from __future__ import annotations
import argparse, functools, html, os, re, shutil, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PART = re.compile(r"^\d\d[a-z]?_")                           # a component notebook: a part of the paper, in its order
JOBS_ORDER = ["train", "evaluate", "compare", "sweep", "figures", "datasets", "benchmark"]   # then the jobs that run it
LINK = re.compile(r'(?P<attr>href|src)="(?P<url>[^"]*)"')


def page_href(stem: str) -> str:
    "Where a notebook's page lives in the site: the home page from index.ipynb, the others under nbs/ as in the repository."
    return "index.html" if stem == "index" else f"nbs/{stem}.html"


def processed_notebooks() -> dict:
    "nbdev's document processors over every notebook, without executing one: {stem: processed notebook}."
    import importlib, nbformat
    from execnb.nbio import nb2str, read_nb
    from nbdev.processors import FilterDefaults, _default_exp
    from nbdev.showdoc import show_doc

    class SiteProcessors(FilterDefaults):
        "nbdev's processors less rm_export (the site shows the exported code) and exec_show_docs (it would execute every cell that imports something, slow ones too)."
        def base_procs(self): return [p for p in super().base_procs() if p.__name__ not in ("rm_export", "exec_show_docs")]

    done = {}
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = read_nb(path); module = _default_exp(nb)
        SiteProcessors()(nb)
        namespace = {"show_doc": show_doc, **(vars(importlib.import_module(f"stmn.{module}")) if module else {})}
        for cell in nb.cells:                        # nbdev's show_doc cells, rendered from the installed module
            call = re.search(r"^show_doc\((.+)\)\s*$", cell.get("source") or "", re.M)
            if cell.cell_type == "code" and call:
                doc = local_source(eval(f"show_doc({call[1]})", namespace)._repr_markdown_())
                cell.outputs = [{"output_type": "display_data", "metadata": {}, "data": {"text/markdown": doc}}]
        done[path.stem] = nbformat.reads(nb2str(nb), as_version=4)       # execnb's notebook as nbformat's, in memory
    return done


def local_source(markdown: str) -> str:
    "show_doc's `[source](git_url/blob/…){Quarto attributes}` as a link to the module in this site (pages live in nbs/)."
    return re.sub(r"\[source\]\(https?://[^)]*?/blob/[^/)]+/(?P<path>[^)#]+)(?:#[^)]*)?\)(?:\{[^}]*\})?",
                  lambda m: f"[source](../{m['path']})", markdown)


def front_matter(nb) -> dict:
    "Title and description from the raw YAML cell nbdev puts first (removed from the notebook)."
    import yaml
    if nb.cells and nb.cells[0].cell_type == "raw" and nb.cells[0].source.startswith("---"):
        meta = yaml.safe_load(nb.cells.pop(0).source.strip().strip("-")) or {}
        return {k: meta.get(k, "") for k in ("title", "description")}
    return {"title": "", "description": ""}


def prepare(nb) -> None:
    "Hide the input of `#| echo: false` cells, strip the `#|` directives, drop the cells left empty (`default_exp`)."
    from nbdev.process import extract_directives
    nb.cells = [c for c in nb.cells if "source" in c]                      # nbdev deletes the source of hidden cells
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        directives = extract_directives(cell, remove=False)
        if directives.get("echo:", [""])[0] == "false": cell.metadata.setdefault("tags", []).append("remove-input")
        cell.source = "\n".join(l for l in cell.source.splitlines() if not re.match(r"\s*#\|", l)).strip("\n")
    nb.cells = [c for c in nb.cells if c.source.strip() or c.get("outputs")]


def sections(stems: list[str]) -> list[dict]:
    "The sidebar: each section's pages (title, href) in order."
    parts = [s for s in stems if PART.match(s)]
    jobs = [s for s in JOBS_ORDER if s in stems] + [s for s in stems if s not in JOBS_ORDER and s != "index" and not PART.match(s)]
    return [{"name": name, "pages": [{"stem": s, "href": page_href(s)} for s in chosen]}
            for name, chosen in (("The paper's parts", parts), ("Jobs", jobs))]


@functools.cache
def exporter(root: str):
    "nbconvert's HTML exporter with the site's template, one per folder depth; MathJax from the site's own copy."
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    ex = HTMLExporter(template_file=str(HERE / "page.html.j2"), exclude_input_prompt=True, exclude_output_prompt=True,
                      mathjax_url=f"{root}_static/mathjax/tex-svg.js")
    ex.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove-input"}, enabled=True), enabled=True)
    return ex


def mathjax_folder() -> Path:
    "MathJax 3 as the `sphinx-mathjax-offline` package ships it (the only PyPI package with MathJax 3's browser build)."
    from importlib.metadata import PackageNotFoundError, distribution
    try: folder = Path(distribution("sphinx-mathjax-offline").locate_file("sphinx-mathjax-offline/static/mathjax"))
    except PackageNotFoundError: folder = None
    if folder is None or not (folder / "tex-svg.js").exists():
        raise SystemExit("make docs: MathJax 3 not found; `make setup` installs it (pip package sphinx-mathjax-offline)")
    return folder


def local_links(page: Path, text: str):
    "The relative links and sources of a rendered page, resolved to paths inside the site (anchors dropped)."
    for m in LINK.finditer(text):
        url = html.unescape(m["url"]).split("#")[0].split("?")[0]
        if not url or re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith("//"): continue
        yield m["url"], (page.parent / url)


def build(out: Path = ROOT / "_docs") -> list[Path]:
    """Build the site into `out`, which is replaced only if absent, empty or made by an earlier build
    (`stmn.base.replace_folder`: never the checkout, nor a folder of the user's); the pages written. Raises on a
    relative link that resolves nowhere, leaving the previous site as it was."""
    from stmn.base import replace_folder
    start, written = time.time(), []

    def fill(tmp: Path):
        (tmp / "nbs").mkdir()
        proc = processed_notebooks()
        stems = sorted(proc)
        side = sections(stems)
        order = ["index"] + [p["stem"] for s in side for p in s["pages"]]
        notebooks, titles = {}, {}
        for stem in order:
            nb = proc[stem]
            meta = front_matter(nb); prepare(nb)
            notebooks[stem], titles[stem] = (nb, meta), meta["title"] or stem
        for s in side:
            for p in s["pages"]: p["title"] = titles[p["stem"]]
        pages = {}                                                            # {page path: its HTML}, written once
        for i, stem in enumerate(order):
            nb, meta = notebooks[stem]
            href = page_href(stem); root = "../" * href.count("/")
            neighbour = lambda j: {"title": titles[order[j]], "href": page_href(order[j])} if 0 <= j < len(order) else None
            site = dict(root=root, href=href, sections=side, title=meta["title"] if stem != "index" else "",
                        description=meta["description"] if stem != "index" else "", source=f"nbs/{stem}.ipynb",
                        previous=neighbour(i - 1), next=neighbour(i + 1))
            body, _ = exporter(root).from_notebook_node(nb, resources={"site": site, "metadata": {"name": titles[stem]}})
            body = re.sub(r'href="((?![a-z]+:)[^"#]*?)\.ipynb(#[^"]*)?"', r'href="\1.html\2"', body)   # notebook links -> pages
            if root: body = re.sub(r'href="index\.html', 'href="../index.html', body)   # nbs/index.ipynb is the home page
            pages[tmp / href] = body
        local_doc_links(tmp, pages, stems)
        for page, body in pages.items(): page.write_text(body, encoding="utf-8")
        (tmp / "_static").mkdir()
        shutil.copy(HERE / "site.css", tmp / "_static" / "site.css")
        shutil.copytree(mathjax_folder(), tmp / "_static" / "mathjax")
        broken = copy_linked_files(tmp, pages)
        if broken: raise SystemExit("make docs: links that lead nowhere:\n" + "\n".join(broken))
        written.extend(p.relative_to(tmp) for p in pages)

    out = replace_folder(out, fill, "the site (make docs)")
    shown = os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else out
    print(f"{len(written)} pages in {shown}/ ({time.time() - start:.0f} s); open {shown}/index.html")
    return [out / p for p in written]


def local_doc_links(site: Path, pages: dict, stems: list[str]) -> None:
    "Point nbdev's links from a `name` in backticks to its documentation (`doc_host` pages) at this site's pages."
    from nbdev.config import get_config
    cfg = get_config(); host = re.escape(cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/"))
    numbered_last = sorted(stems, key=lambda s: bool(re.match(r"\d", s)))   # 09_sweep, which exports, wins over sweep
    by_doc_page = {re.sub(r"^\d+[a-z]?_", "", s): s for s in numbered_last}   # nbdev names 04_memory's page memory.html
    ids = {p: set(re.findall(r'\sid="([^"]+)"', body)) for p, body in pages.items()}
    for page in pages:
        def local(m):
            stem = by_doc_page.get(m["page"])
            if stem is None: return m[0]
            target = site / page_href(stem)
            anchor = next((i for i in ids.get(target, ()) if i.lower() == m["anchor"].lower()), m["anchor"])
            return f'href="{os.path.relpath(target, page.parent)}#{anchor}"'
        pages[page] = re.sub(rf'href="{host}/(?P<page>[\w-]+)\.html#(?P<anchor>[^"]*)"', local, pages[page])


def copy_linked_files(site: Path, pages: dict) -> list[str]:
    "Copy each repository file a page links to (figures, bench tables) into the site; the links that resolve nowhere."
    broken = []
    for page, body in pages.items():
        for url, target in local_links(page, body):
            target = Path(os.path.normpath(target))
            if target.exists(): continue
            try: source = ROOT / target.relative_to(site)
            except ValueError: source = None
            if source is not None and source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True); shutil.copy(source, target)
            else: broken.append(f"  {page.relative_to(site)}: {url}")
    return broken


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "_docs"), help="the site's folder (replaced)")
    try: build(Path(parser.parse_args().out).resolve())
    except FileExistsError as e: raise SystemExit(f"make docs: {e}") from None     # a refusal, said in one line
