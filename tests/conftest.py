"""Shared fixtures: the repository root and one synthetic dataset cache for the whole session."""
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def data_home(tmp_path_factory):
    "A private $STMN_DATA for the session, so tests never touch the user's cache."
    d = tmp_path_factory.mktemp("stmn_data")
    old = os.environ.get("STMN_DATA")
    os.environ["STMN_DATA"] = str(d)
    yield d
    if old is None: os.environ.pop("STMN_DATA", None)
    else: os.environ["STMN_DATA"] = old
