"""Time `gvmrl.allocation.allocate` on 10^6 prompts (target: well under a second).

python bench/allocation.py [--prompts 1000000] [--repeats 5]
    [--output bench/results/allocation.json]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from gvmrl.allocation import allocate
from gvmrl.io import write_json


def time_call(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="bench/results/allocation.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # accept rates on the N'=8 grid, grad norms anti-correlated with them (about -0.6 on the
    # built-in task, BENCHMARKS.md)
    p = rng.integers(0, 9, args.prompts) / 8
    g = np.abs(rng.normal(1.5 - p, 0.3))
    budget = args.samples_per_prompt * args.prompts
    cases = {
        "gvm": dict(),
        "uniform": dict(rule="uniform"),
        "gvm+caps+floors": dict(min_size=1, max_size=4 * args.samples_per_prompt),
        "gvm+filters": dict(drop_above=0.9, min_expected_accepts=1.0),
    }
    results = {}
    for name, kwargs in cases.items():
        seconds = time_call(lambda: allocate(p, g, budget, **kwargs), args.repeats)
        results[name] = seconds
        print(
            f"{name:>16}: {seconds * 1e3:8.1f} ms for {args.prompts:,} prompts, budget {budget:,}"
        )
    write_json(
        args.output,
        {
            "prompts": args.prompts,
            "budget": budget,
            "best_seconds": results,
            "machine": platform.processor() or platform.machine(),
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
