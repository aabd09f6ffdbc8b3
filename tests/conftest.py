"""Shared pytest fixtures. Tests read only tests/data/ or data they make."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GALAXALIGN_PROGRESS", "0")

DATA = Path(__file__).parent / "data"
CUTOUTS = DATA / "decals_cutouts"


@pytest.fixture(scope="session")
def cutouts_dir() -> Path:
    return CUTOUTS


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module: on a shared 2-core machine OpenMP spinning makes 2 threads slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
