"""Build the CPU custom operators (ernie_engine/csrc/) ahead of time, so serving processes only load them.

Called by scripts/setup.sh (for backend/) and scripts/install_backend.sh (`--backend DIR`: an installed copy,
built into DIR/.runtime/cpu_kernels); safe to re-run (a no-op when the sources are unchanged). Exits 0 even
when the build is impossible here (no AVX512, no compiler): the engine then uses its Paddle path, as it logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    checkout_backend = Path(__file__).resolve().parent.parent / "backend"
    parser.add_argument("--backend", type=Path, default=checkout_backend,
                        help="the folder holding the ernie_engine package (default: backend/ here)")
    args = parser.parse_args(argv)
    if not (args.backend / "ernie_engine").is_dir():
        parser.error(f"--backend {args.backend}: no ernie_engine package there")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(args.backend.resolve()))
    from ernie_engine.layers import cpu_kernels

    print(f"cpu kernels: {'ready' if cpu_kernels.available() else 'unavailable (Paddle fallback)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
