"""Shared fixtures: the repository root and one synthetic dataset cache for the whole session."""
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root():
    return ROOT


def session_folder(tmp_path_factory, name: str) -> Path:
    "`name` in the folder all of this session's pytest workers share (under `pytest -n`, the root above each worker's own)."
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)/name


@pytest.fixture(scope="session")
def data_home(tmp_path_factory):
    """A private $STMN_DATA for the session, so tests never touch the user's cache; one for all of the session's pytest
    workers, so the synthetic dataset is generated once (concurrent generation is safe: tests/test_faults.py)."""
    d = session_folder(tmp_path_factory, "stmn_data")
    d.mkdir(exist_ok=True)
    old = os.environ.get("STMN_DATA")
    os.environ["STMN_DATA"] = str(d)
    yield d
    if old is None: os.environ.pop("STMN_DATA", None)
    else: os.environ["STMN_DATA"] = old


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_home):
    """The one trained run the session's tests share (nbs/train.ipynb, `TINY`, `TRAINED_EPOCHS`): trained once even
    under `pytest -n`, by whichever worker asks first, under a file lock in the session's shared temporary folder.
    Tests read it; a test that changes a run copies it first."""
    from filelock import FileLock
    from helpers import run_train, TRAINED_EPOCHS
    shared = session_folder(tmp_path_factory, "trained-run")
    with FileLock(f"{shared}.lock"):
        if not (shared/"metrics.json").is_file(): run_train(ROOT, shared, epochs=TRAINED_EPOCHS)
    return shared


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: browser, cluster, sweep and trained-notebook tests (`make test-fast` leaves them out)")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:     # pytest -n: the cores shared out, for the worker and what it starts
        from stmn.recipes import allocated_cpus
        os.environ["OMP_NUM_THREADS"] = str(max(1, allocated_cpus() // workers))


STARTED_FIRST = ("test_slurm.py", "test_browser.py")   # they wait on the cluster and the browser: the other worker computes meanwhile


def pytest_collection_modifyitems(items):
    "Modules that mostly wait go first, so that under `pytest -n 2` their waits overlap the rest (a stable sort)."
    items.sort(key=lambda item: item.path.name not in STARTED_FIRST)
