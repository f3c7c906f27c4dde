"""Time per iteration and per phase: 1 process x 1 thread against K processes x 1 thread.

Trains the built-in task from the built-in checkpoint (RAFT++, the paper's GVM arm: 8
pre-samples per prompt, a budget of 8 x prompts, no evaluation) once per process count, reads
each run's metrics.jsonl (the trainer's `time_<phase>` figures and `wall_time`, from rank 0 in
a multi-process run) and reports seconds per iteration and per phase, the mean over the
iterations after the first (which pays one-off costs), and the K-process / 1-process ratios
(goal for K = 2: at most 0.6).

    python bench/scaling.py                        # 1 and 2 processes, 3 iterations of 64 prompts
    python bench/scaling.py --processes 1          # the 1-process figures alone
    python bench/scaling.py --device cuda --processes 1 8

One process is a plain `gvmrl train`; K > 1 are `torchrun --standalone --nproc-per-node K -m
gvmrl train` (launched as `python -m torch.distributed.run`, what the `torchrun` script runs).
Every process runs with OMP_NUM_THREADS=1 and `threads=1`, so K processes use K cores.

Writes OUT (default bench/results/scaling.json); the runs live under --work-dir (default
bench/results/scaling/runs, not committed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gvmrl.analysis import load_run
from gvmrl.experiments import builtin_run_overrides
from gvmrl.io import write_json

from common import QUIET, arm_overrides

GOAL_RATIO = 0.6  # the goal: 2 processes take at most 0.6x the time of one


def train_command(args: argparse.Namespace, processes: int, output_dir: Path) -> list[str]:
    overrides = [
        *builtin_run_overrides(
            algorithm=args.algorithm,
            seed=args.seed,
            iterations=args.iterations,
            prompts=args.prompts,
            eval_every=0,
        ),
        *arm_overrides(args.arm, args.prompts),
        *QUIET,
        "threads=1",
        f"device={args.device}",
        "save_final=false",
        *args.set,
    ]
    if processes == 1:
        launcher = [sys.executable, "-m", "gvmrl"]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "gvmrl",
        ]
    sets = [part for value in overrides for part in ("--set", value)]
    return [*launcher, "train", *sets, "--output-dir", str(output_dir), "--restart"]


def run_once(args: argparse.Namespace, processes: int) -> dict:
    """Train with `processes` processes; per-iteration and mean seconds, total and per phase."""
    output_dir = args.work_dir / f"{processes}x1"
    command = train_command(args, processes, output_dir)
    print(f"{processes} process(es): {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - started
    rows = [r for r in load_run(output_dir) if r["iteration"] >= 1]
    if processes > 1 and any(r.get("world_size") != processes for r in rows):
        raise SystemExit(
            f"scaling: the {processes}-process run did not log world_size={processes} in "
            f"{output_dir / 'metrics.jsonl'}: it did not train as one job; no figures written"
        )
    walls = np.array([r["wall_time"] for r in rows])
    iteration_seconds = np.diff(walls, prepend=0.0)
    phases = sorted({k for r in rows for k in r if k.startswith("time_")})
    per_iteration = [
        {"iteration": r["iteration"], "seconds": float(s), **{p: r.get(p, 0.0) for p in phases}}
        for r, s in zip(rows, iteration_seconds)
    ]
    measured = per_iteration[1:] or per_iteration  # the first iteration pays one-off costs
    mean = {
        key: float(np.mean([row[key] for row in measured])) for key in ["seconds", *phases]
    }
    return {
        "processes": processes,
        "threads_per_process": 1,
        "command": ["python", *command[1:]],
        "job_seconds": elapsed,
        "iterations": per_iteration,
        "mean_after_first": mean,
        "samples_per_iteration": float(np.mean([r["samples"] for r in rows])),
    }


def print_table(runs: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Print seconds per iteration and per phase for each process count; return the ratios to
    one process."""
    counts = sorted(runs)
    keys = ["seconds"] + sorted(
        {k for r in runs.values() for k in r["mean_after_first"]} - {"seconds"}
    )
    base = runs.get(1)
    header = ["phase", *(f"{k}x1 s/iter" for k in counts)]
    if base is not None and len(counts) > 1:
        header += [f"{k}x1 / 1x1" for k in counts if k != 1]
    print(" | ".join(header))
    ratios: dict[str, dict[str, float]] = {}
    for key in keys:
        cells = [f"{runs[k]['mean_after_first'].get(key, float('nan')):.2f}" for k in counts]
        for k in counts:
            if base is not None and k != 1:
                one = base["mean_after_first"].get(key, 0.0)
                ratio = runs[k]["mean_after_first"].get(key, float("nan")) / one if one else None
                ratios.setdefault(f"{k}x1", {})[key] = ratio
                cells.append("-" if ratio is None else f"{ratio:.2f}")
        name = "iteration" if key == "seconds" else key.removeprefix("time_")
        print(" | ".join([name, *cells]))
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--arm", default="gvm", help="a bench arm (bench/common.py)")
    parser.add_argument("--algorithm", default="raft++")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--work-dir", type=Path, default=Path("bench/results/scaling/runs"))
    parser.add_argument("--output", type=Path, default=Path("bench/results/scaling.json"))
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be >= 2: the first iteration is not timed")
    if any(k < 1 for k in args.processes):
        parser.error("--processes must be >= 1")

    runs = {k: run_once(args, k) for k in sorted(set(args.processes))}
    ratios = print_table(runs)
    for name, by_phase in ratios.items():
        ratio = by_phase.get("seconds")
        if name == "2x1" and ratio is not None:
            verdict = "met" if ratio <= GOAL_RATIO else "not met"
            print(f"goal: 2 processes at most {GOAL_RATIO}x one: {ratio:.2f}x, {verdict}")
    write_json(
        args.output,
        {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": {f"{k}x1": run for k, run in runs.items()},
            "ratios_to_one_process": ratios,
        },
    )
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
