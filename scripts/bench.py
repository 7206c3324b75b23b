"""Prefill speed-up, method overhead and KV-cache bytes of every method against the FLOP ideal.

A thin wrapper around :mod:`tokreduce.eval.bench` (the same as ``tokreduce bench``); see its docstring for
what is measured and how.

    python scripts/bench.py --quick
    python scripts/bench.py --threads 1 --out bench-results
"""

import sys

from tokreduce.eval.bench import main

if __name__ == "__main__":
    sys.exit(main())
