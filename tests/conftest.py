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
