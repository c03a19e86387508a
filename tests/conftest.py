"""Shared test fixtures. Server fixtures live in tests/fixtures/ and are registered here."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT))

pytest_plugins: list[str] = ["tests.fixtures.triton", "tests.fixtures.frontend"]


@pytest.fixture(scope="session")
def random_model_dir(ernie_random_checkpoint: Path) -> Path:
    """The tiny random checkpoint from scripts/make_random_model.py, made once per session."""
    return ernie_random_checkpoint
