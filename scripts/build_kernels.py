"""Build the CPU custom operators (csrc/) ahead of time, so serving processes only load them.

Called by scripts/setup.sh; safe to re-run (a no-op when csrc/ is unchanged). Exits 0 even when the build is
impossible here (no AVX512, no compiler): the engine then uses its Paddle path, as it logs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))

from ernie_engine.layers import cpu_kernels  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"cpu kernels: {'ready' if cpu_kernels.available() else 'unavailable (Paddle fallback)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
