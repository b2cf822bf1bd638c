# The README's two commands are `make train` and `make test`; each sets up what it needs first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stmn-installed
OUT    ?= runs/train

.PHONY: setup kernel browser slurm train search test test-fast outputs docs compare evaluate figures memory-study bench bench-record gpu-check gpu-record gpu-wheels export clean-nbs readme

setup: $(STAMP) kernel

# Create the virtual environment if missing and install the package editable with its dev tools (idempotent).
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e ".[dev]"
	@# pip byte-compiles one file at a time; this uses every core (2 min 2 s → 1 min 41 s for a clean .venv on 2 cores). A file that does not compile
	@# (a package's Python-2 fixture) is left to import from source, as pip leaves it.
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
	touch $@

# Register the Jupyter kernel the notebooks name ("stmn"), pointing at this checkout's environment.
kernel: $(STAMP)
	$(BIN)/python -m ipykernel install --user --name stmn --display-name "Python (stmn)" >/dev/null

# Main job: train and evaluate STMN on the embedded synthetic dataset (CPU, minutes); then where the run falls in the seed band of make compare.
train: setup
	mkdir -p $(dir $(OUT))
	$(BIN)/papermill nbs/train.ipynb $(OUT).ipynb -p out_dir $(OUT) --log-output --no-progress-bar
	@$(BIN)/python -c "import json; m = json.load(open('$(OUT)/metrics.json')); print(f\"rank-1 {100*m['rank1']:.1f}%  mAP {100*m['mAP']:.1f}%  (protocol {m['protocol']}, sampling {m['sampling']}, {m['n_query']} queries x {m['n_gallery']} gallery, {m['wall_seconds']:.0f} s)  -> $(OUT)/metrics.json\")"
	@$(BIN)/python -c "import json, os; from stmn.evaluation import seed_band; b = 'bench/demo_band.json'; print(seed_band(json.load(open('$(OUT)/metrics.json')), json.load(open(b))) if os.path.exists(b) else f'no seed band: make compare writes {b}')"

# Debian's Chromium for the browser tests (apt-get, as root); where it cannot be installed, says so and those tests skip.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "apt-get could not install chromium: the browser tests will be skipped"; \
	else echo "chromium is not installed and cannot be here (apt-get needs root): the browser tests will be skipped"; fi

# A one-node SLURM cluster for the sweep tests (apt-get and the daemons, as root; idempotent); where it cannot start,
# says why and those tests skip.
slurm:
	@bash tests/cluster/start_slurm.sh

# Every test: each notebook executed once in a fresh kernel as nbdev_test runs it (slow cells skipped), the component
# notebooks' stored outputs compared with what they print now (no stored output may name the machine), the numeric
# ones again under a second CPU instruction set; then the suite, the site and JupyterLab in Chromium, the SLURM cluster.
# pytest runs on two workers (one thread each, a module to a worker): a module that waits on the cluster or the browser
# leaves the other core to the rest.
PYTEST = $(BIN)/python -m pytest tests -q -rs --durations=12 -n 2 --dist loadfile
test: setup browser slurm
	$(BIN)/python tests/notebooks.py check --workers 2
	$(BIN)/python tests/notebooks.py check --workers 2 --dispatch second
	$(PYTEST)

# The edit loop (2 min 35 s on 2 cores): the component notebooks checked in forks of a preloaded worker (less the two-process torchrun one), and the suite
# without its slow tests (browser, cluster, sweeps, trained notebooks: `-m slow`).
test-fast: setup
	$(BIN)/python tests/notebooks.py check --workers 2 --fast --in-process
	$(PYTEST) -m "not slow"

# Execute the component notebooks (00_*-12_*, index) in fresh kernels and store their outputs; commit them after.
outputs: setup
	$(BIN)/python tests/notebooks.py store --workers 2

# The companion site: nbdev-processed notebooks rendered with their outputs -> _docs/index.html (offline, about a minute).
docs: setup
	$(BIN)/python nbs/_site/build.py

# The GPU path in one command: every CUDA branch checked and measured in under 8 minutes on one H100-class GPU, results
# written section by section to runs/gpu-check/gpu.md and gpu.json (WHEELS=wheels/py3.12: install papermill, ipykernel and
# submitit from there). Without CUDA it runs what it can with tiny shapes on the CPU. A machine with only PyTorch runs
# the same script: PYTHONPATH=. python bench/gpu_check.py --wheels wheels/py3.12
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_OUT ?= runs/gpu-check
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) bench/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) --out $(GPU_OUT)

# The same, written to bench/gpu.md and bench/gpu.json: the committed record of a GPU run.
gpu-record:
	$(MAKE) gpu-check GPU_OUT=bench

# Wheels of what gpu-check needs beyond PyTorch's stack (papermill, ipykernel, submitit and their dependencies), for
# Python $(PY) on Linux x86-64, into wheels/py$(PY): fill it where there is a registry, carry it to the GPU machine.
PY ?= 3.12
gpu-wheels:
	python3 -m pip download --quiet --disable-pip-version-check --dest wheels/py$(PY) --only-binary=:all: --python-version $(PY) \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
	  --platform manylinux1_x86_64 --platform any papermill ipykernel submitit
	@echo "wheels/py$(PY): $$(ls wheels/py$(PY) | wc -l) wheels; on the GPU machine: PYTHONPATH=. python bench/gpu_check.py --wheels wheels/py$(PY)"

# Developer helpers.
export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

readme: $(STAMP)
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN

# STMN against the baseline over 3 seeds on the synthetic dataset (about 40 minutes on 2 CPU cores); writes the seed band bench/demo_band.json.
compare: setup
	mkdir -p runs
	$(BIN)/papermill nbs/compare.ipynb runs/compare.ipynb --log-output --no-progress-bar

# The checkpoint of `make train` under every protocol, AP definition, test sampling and re-ranking; rank lists.
evaluate: setup
	$(BIN)/papermill nbs/evaluate.ipynb runs/evaluate.ipynb -p checkpoint $(OUT)/checkpoint.pt -p out_dir runs/evaluate --log-output --no-progress-bar

# Search your own video (nbs/search.ipynb; python -m stmn.search --help): make train's checkpoint on the synthetic test
# scene unless SEARCH names inputs, e.g. SEARCH="-p gallery cam2.mp4 -p gallery_tracks cam2.txt". Writes runs/search/.
search: setup
	mkdir -p runs
	$(BIN)/papermill nbs/search.ipynb runs/search.ipynb -p checkpoint $(OUT)/checkpoint.pt $(SEARCH) --log-output --no-progress-bar

# The supplement's Figs. 1-4 and the numbers behind them; trains what is missing on the synthetic dataset (about 15 minutes on 2 CPU cores).
figures: setup
	mkdir -p runs
	$(BIN)/papermill nbs/figures.ipynb runs/figures.ipynb --log-output --no-progress-bar

# The pre-registered memory study (bench/memory_study/PLAN.md): pretrains the synthetic trunk, trains every run (a rerun
# skips finished ones), writes bench/memory_study/results.json and memory_study.png, prints each hypothesis's verdict.
memory-study: setup
	mkdir -p runs
	$(BIN)/papermill nbs/memory_study.ipynb runs/memory_study.ipynb --log-output --no-progress-bar

# Speed and memory: training step vs plain ResNet-50, data pipeline, extraction, evaluation, checkpoints -> runs/benchmark.md, runs/benchmark.json (AUTHORS_REPO=path adds the authors' step).
BENCH_TABLE ?= runs/benchmark.md
bench: setup
	mkdir -p runs
	$(BIN)/papermill nbs/benchmark.ipynb runs/benchmark.ipynb -p authors_repo "$(AUTHORS_REPO)" -p table $(BENCH_TABLE) --log-output --no-progress-bar

# The same, written to bench/results.md: the committed record.
bench-record:
	$(MAKE) bench BENCH_TABLE=bench/results.md
