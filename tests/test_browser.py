"""The companion site and JupyterLab in a real browser: Debian's Chromium driven by Playwright, on the loopback only.

`make browser` (a step of `make test`) installs Chromium with apt-get where it can; where Chromium is missing or cannot
start, these tests are skipped with the reason (pytest -rs prints it), never silently.
"""
from __future__ import annotations
import functools, http.server, json, os, re, secrets, shutil, signal, socket, subprocess, sys, threading, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
CHROMIUM_NAMES = ("chromium", "chromium-browser")

pytestmark = pytest.mark.slow                     # `make test-fast` leaves this module out


def chromium_path() -> str | None:
    "Debian's Chromium, if installed (CHROMIUM=path overrides)."
    if os.environ.get("CHROMIUM"): return os.environ["CHROMIUM"]
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


@pytest.fixture(scope="module")
def browser():
    "A headless Chromium (skips, saying why, where it is missing or cannot start)."
    path = chromium_path()
    if path is None: pytest.skip("Chromium is not installed (make browser installs it with apt-get, which needs root)")
    try: from playwright.sync_api import sync_playwright
    except ImportError as e: pytest.skip(f"playwright is not installed ({e}); make setup installs it")
    with sync_playwright() as p:
        try: b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e: pytest.skip(f"Chromium at {path} cannot start: {str(e).splitlines()[0]}")
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class Recorder:
    "Console errors, page errors and failed requests of one page."
    def __init__(self, page):
        self.problems = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))


# ---- the companion site ------------------------------------------------------------------------------------------
MATH = re.compile(r"\$\$.+?\$\$|\$[^$\n]+\$", re.S)


def has_equation(notebook: Path) -> bool:
    "Whether a notebook's markdown holds LaTeX maths (`$…$` or `$$…$$`)."
    cells = json.loads(notebook.read_text())["cells"]
    return any(c["cell_type"] == "markdown" and MATH.search("".join(c["source"])) for c in cells)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "`make docs` into a temporary folder, served over HTTP on 127.0.0.1: (base url, folder)."
    out = tmp_path_factory.mktemp("site") / "_docs"
    run = subprocess.run([sys.executable, str(ROOT / "nbs/_site/build.py"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, f"make docs failed:\n{run.stdout}\n{run.stderr}"
    handler = functools.partial(QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", out
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def site_pages(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.html") if "_static" not in p.parts)


def test_site_has_a_page_per_notebook_in_the_papers_order(site):
    base, folder = site
    pages = site_pages(folder)
    expected = ["index.html"] + [f"nbs/{p.stem}.html" for p in (ROOT / "nbs").glob("*.ipynb") if p.stem != "index"]
    assert sorted(expected) == pages
    nav = re.findall(r'<li[^>]*><a href="([^"]+)"', (folder / "nbs/04_memory.html").read_text())
    numbered = [n for n in nav if re.search(r"nbs/\d", n)]
    assert numbered == sorted(numbered) and len(numbered) == len([p for p in pages if re.search(r"nbs/\d", p)])


def test_site_pages_in_chromium(browser, site):
    "Every page: loads without a console error, every image decodes, every internal link resolves, equations typeset."
    base, folder = site
    context = browser.new_context()
    problems, checked_links = [], {}
    for name in site_pages(folder):
        page = context.new_page(); recorder = Recorder(page)
        page.goto(base + name, wait_until="load")
        stem = Path(name).stem
        source = ROOT / "nbs" / f"{stem}.ipynb"
        if has_equation(source):
            try: page.wait_for_function("() => document.querySelectorAll('mjx-container').length > 0", timeout=20_000)
            except Exception: problems.append(f"{name}: no equation was typeset")
            if page.locator("mjx-merror, [data-mjx-error]").count(): problems.append(f"{name}: MathJax reports an error")
        for src, complete, width in page.eval_on_selector_all("img", "els => els.map(e => [e.currentSrc, e.complete, e.naturalWidth])"):
            if not (complete and width > 0): problems.append(f"{name}: image does not decode: {src[:80]}")
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            if not href.startswith(base): continue
            checked_links.setdefault(href, name)
        problems += [f"{name}: {p}" for p in recorder.problems]
        page.close()
    for href, name in checked_links.items():
        url, _, fragment = href.partition("#")
        response = context.request.get(url)
        if response.status != 200: problems.append(f"{name}: link {href} -> HTTP {response.status}"); continue
        if fragment and f'id="{fragment}"' not in response.text(): problems.append(f"{name}: link {href}: no element #{fragment}")
    RUNS.mkdir(exist_ok=True)
    page = context.new_page(); page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(base + "nbs/04_memory.html", wait_until="load")
    page.wait_for_function("() => document.querySelectorAll('mjx-container').length > 0", timeout=20_000)
    page.screenshot(path=str(RUNS / "site-04_memory.png"))
    context.close()
    assert not problems, "\n".join(problems)
    assert len(checked_links) > len(site_pages(folder))          # the sidebar alone links every page


# ---- JupyterLab --------------------------------------------------------------------------------------------------
LAB_SETTINGS = {                                      # a throwaway settings folder: never write the notebook back
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},   # every cell in the page
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "The project's own `jupyter lab` on 127.0.0.1 with a token, rooted at the checkout: (url, token)."
    tmp = tmp_path_factory.mktemp("lab")
    for name, value in LAB_SETTINGS.items():
        (tmp / "settings" / Path(name).parent).mkdir(parents=True, exist_ok=True)
        (tmp / "settings" / name).write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    jupyter = Path(sys.executable).parent / "jupyter"
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen([str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--allow-root",
                             "--ServerApp.port_retries=0"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):
        try: urllib.request.urlopen(f"{url}api/status?token={token}", timeout=2); break
        except Exception: time.sleep(.5)
        if proc.poll() is not None: break
    else: proc.poll()
    if proc.returncode is not None:
        pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{(tmp / 'lab.log').read_text()[-3000:]}")
    yield url, token
    os.killpg(proc.pid, signal.SIGTERM)
    try: proc.wait(20)
    except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)


def test_jupyterlab_runs_04_memory_through_the_ui(browser, lab):
    "Open nbs/04_memory.ipynb in JupyterLab, Run All from the Run menu with the stmn kernel: text and a figure, no error."
    url, token = lab
    notebook = ROOT / "nbs/04_memory.ipynb"
    before = notebook.read_bytes()
    n_code = sum(c["cell_type"] == "code" for c in json.loads(before)["cells"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}lab/tree/nbs/04_memory.ipynb?token={token}")
    panel = page.locator(".jp-NotebookPanel:visible")
    RUNS.mkdir(exist_ok=True)
    try:                                                              # the notebook's own kernel, started and idle
        page.wait_for_function("""() => { const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
            return p && p.querySelector('.jp-Toolbar-kernelName')?.textContent.trim() === 'Python (stmn)'
                     && p.querySelector(".jp-Notebook-ExecutionIndicator[data-status='idle']"); }""", timeout=120_000)
    except Exception:
        page.screenshot(path=str(RUNS / "jupyterlab-04_memory-failed.png"))
        raise AssertionError("the stmn kernel did not start in JupyterLab (make kernel registers it); see runs/jupyterlab-04_memory-failed.png")
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    page.wait_for_function("""n => { const p = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];
                                      return p.length === n && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }""",
                           arg=n_code, timeout=300_000)
    texts = panel.locator(".jp-OutputArea-output").all_inner_texts()
    assert not [t for t in texts if "Traceback (most recent call last)" in t or "Error" in t.split("\n")[0]], texts
    assert any("spread" in t for t in texts) and any(t.startswith("channel:") for t in texts)
    figure = panel.locator(".jp-OutputArea-output img").first
    figure.scroll_into_view_if_needed()
    assert figure.evaluate("e => e.complete && e.naturalWidth > 0")
    page.screenshot(path=str(RUNS / "jupyterlab-04_memory.png"))
    page.close()
    assert notebook.read_bytes() == before, "JupyterLab wrote the notebook back"
