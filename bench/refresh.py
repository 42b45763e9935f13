"""The per-epoch refresh benchmarks in one run: the GMM (bench/refresh_gmm.py) and the
neighbour search (bench/refresh_neighbours.py).  Arguments are passed to both
(``--quick`` for a smoke run).

    .venv/bin/python -m bench.refresh [--quick]
"""
from __future__ import annotations

import runpy
import sys


def main() -> None:
    args = sys.argv[1:]
    for module in ("bench.refresh_gmm", "bench.refresh_neighbours"):
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()
