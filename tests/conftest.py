"""Shared test fixtures. Server fixtures live in tests/fixtures/ and are registered here."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT))

pytest_plugins: list[str] = []
