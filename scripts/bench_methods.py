"""Selection time of every method on CPU tensors, and DivPrune against the reference O(k^2 N) greedy loop.

Prints a markdown table. Timings are medians of a few runs on this machine: compare ratios within one
run, not absolute times across machines.

    python scripts/bench_methods.py            # N = 576, 2304, 6272; C = 896, 3584; keep = 0.1
    python scripts/bench_methods.py --quick    # N = 576 only
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from tokreduce import TokenContext, get_reducer, list_reducers
from tokreduce.similarity import cosine_matrix

GRIDS = {576: (1, 24, 24), 2304: (4, 24, 24), 6272: (32, 14, 14)}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def divprune_reference_greedy(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The reference formulation: at step i, min over the i selected rows of the distance matrix (O(k^2 N))."""
    picks = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist.index_select(0, picks[:i]).min(dim=0).values
        picks[i] = scores.argmax()
    return picks


def divprune_ours_greedy(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Our running-minimum loop on a given distance matrix (what tokreduce.functional.divprune does after the matrix)."""
    n = dist.shape[0]
    picks = torch.empty(k, dtype=torch.long)
    nearest = dist.diagonal_scatter(torch.full((n,), float("inf"))).amin(dim=-1)
    picks[0] = nearest.argmax()
    running = dist[picks[0]].clone()
    running[picks[0]] = -float("inf")
    for step in range(1, k):
        pick = running.argmax()
        picks[step] = pick
        torch.minimum(running, dist[pick], out=running)
        running[pick] = -float("inf")
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 576 only")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = [576] if args.quick else [576, 2304, 6272]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, keep={args.keep}\n")
    print("| method | N | C | k | select ms |")
    print("|---|---|---|---|---|")
    for n in sizes:
        for c in (896, 3584):
            x = torch.randn(1, n, c)
            ctx = TokenContext(
                grid=GRIDS[n], attention=torch.rand(1, n), metric=torch.randn(1, n, 64), keys=torch.randn(1, n, 128),
                text_hidden=torch.randn(1, 32, c), text_keys=torch.randn(1, 32, 128),
            )
            for name in list_reducers():
                reducer = get_reducer(name, keep=args.keep)
                repeats = args.repeats if n <= 2304 else 1
                seconds = median_time(partial(reducer.reduce, x, ctx), repeats)
                print(f"| {name} | {n} | {c} | {reducer.num_kept(n, GRIDS[n])} | {seconds * 1e3:.1f} |", flush=True)

    print("\nDivPrune: ours (running minimum) vs the reference O(k^2 N) loop, C = 3584\n")
    print("| N | k | matrix ms | greedy ours ms | greedy ref ms | greedy speed-up | total ours ms | total ref ms | total speed-up | same picks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        k = max(1, round(args.keep * n))
        x = torch.randn(n, 3584)
        repeats = args.repeats if n <= 2304 else 1
        matrix = median_time(partial(cosine_matrix, x[None], x[None]), repeats)
        dist = 1 - cosine_matrix(x[None], x[None])[0]
        ours = median_time(partial(divprune_ours_greedy, dist, k), repeats)
        ref = median_time(partial(divprune_reference_greedy, dist, k), repeats)
        same = divprune_ours_greedy(dist, k).sort().values.tolist() == divprune_reference_greedy(dist, k).sort().values.tolist()
        print(
            f"| {n} | {k} | {matrix * 1e3:.1f} | {ours * 1e3:.1f} | {ref * 1e3:.1f} | {ref / ours:.1f}x | "
            f"{(matrix + ours) * 1e3:.1f} | {(matrix + ref) * 1e3:.1f} | {(matrix + ref) / (matrix + ours):.2f}x | {same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
