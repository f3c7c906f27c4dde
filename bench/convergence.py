"""Does GVM reach the target accuracy with fewer generated samples than uniform sampling?

Runs {algorithms} x {arms} x {seeds} on one or more built-in tasks, all from the built-in
checkpoint, then reads each run's held-out accuracy curve through a fitted saturating curve
(gvmrl.analysis) and reports, per arm, the mean and spread over seeds of the iterations,
generated samples (pre-samples included) and wall time needed to reach the target accuracy,
and the same costs read off the arm's seed-mean curve (`*_of_mean`; the speed-ups use these).

Target (per task and algorithm): the accuracy uniform-n reaches at its last iteration, read off
the fitted curve of its seed-averaged accuracy.

Arms:
  uniform-n       n = 8 samples per prompt
  uniform-2n      n = 16: generates as much per iteration as GVM with its pre-samples
  gvm             N' = 8 pre-samples (not trained on), budget 8 x prompts allocated (the paper)
  gvm-reuse       as gvm, and the pre-samples are trained on too
  gvm-incl-2      budget-inclusive: N' = 2 pre-samples (trained on) + 6 x prompts allocated
  gvm-incl-4      budget-inclusive: N' = 4 pre-samples (trained on) + 4 x prompts allocated

    python bench/convergence.py --seeds 5 --algorithms raft++ grpo --tasks builtin builtin-hard
    python bench/convergence.py --quick        # a smoke run: 1 seed, 2 arms, 3 iterations

Each run evaluates 512 x 4 held-out samples by default (--eval-prompts, --eval-samples);
--final-eval-samples K adds a fresh K-sample evaluation of every final checkpoint and of the
start, compared with uniform-n per seed (paired), for a final reading with less evaluation noise.

Runs are resumable: rerunning the command skips finished runs and resumes unfinished ones.
Writes OUT/results.json, OUT/curves-<task>-<algorithm>.png and OUT/BENCHMARKS-section.md (one
markdown table per task and algorithm, in the format of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gvmrl.algorithms import ALGORITHMS
from gvmrl.analysis import (
    cost_at_iteration,
    cost_to_target,
    eval_curve,
    fit_saturating,
    fitted_cost,
    load_run,
    paired_difference,
    plot_curves,
    seed_mean_curve,
)
from gvmrl.config import load_config
from gvmrl.experiments import builtin_run_overrides
from gvmrl.train import train

from common import BENCH_ARMS, QUIET, TASKS, arm_overrides, is_gvm, write_results

COSTS = {"iteration": "iterations", "samples_generated": "samples", "wall_time": "seconds"}


def run_config(args, task: str, algorithm: str, arm: str, seed: int):
    train_data, eval_data = TASKS[task]
    overrides = [
        *builtin_run_overrides(
            algorithm=algorithm,
            seed=seed,
            iterations=args.iterations,
            prompts=args.prompts,
            train_data=train_data,
            eval_data=eval_data,
            eval_every=args.eval_every,
            eval_samples=args.eval_samples,
            eval_prompts=args.eval_prompts,
        ),
        f"optim.lr={args.lr}",
        *QUIET,
        *arm_overrides(arm, args.prompts),
    ]
    if algorithm == "grpo" and is_gvm(arm):
        overrides.append(
            "gvm.min_size=2"
        )  # a GRPO group needs two samples for a non-zero advantage
    return load_config(None, overrides + args.set)


# Seeds of the final re-evaluations, apart from the training loop's own evaluation seeds.
REEVAL_SEED = 10_000


def reevaluate(model: str | Path, config, task: str, args, seed: int, output: Path) -> float:
    """Held-out accuracy of `model` from a fresh `gvmrl eval` with the run's sampling settings
    and --final-eval-samples responses per prompt (cached in `output`)."""
    if not output.exists():
        command = [
            sys.executable,
            "-m",
            "gvmrl",
            "eval",
            f"--model={model}",
            f"--data={TASKS[task][1]}",
            f"--limit={args.eval_prompts}",
            f"--samples={args.final_eval_samples}",
            f"--temperature={config.eval.temperature}",
            f"--top-p={config.rollout.top_p}",
            f"--max-new-tokens={config.rollout.max_new_tokens}",
            f"--seed={REEVAL_SEED + seed}",
            f"--output={output}",
            "--no-progress",
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads(output.read_text())["results"]
    return float(next(iter(results.values()))["accuracy"])


def summarise(
    runs: dict[str, list[list[dict]]],
    reevals: dict[str, list[float]] | None = None,
    start_reevals: list[float] | None = None,
) -> tuple[float, list[dict]]:
    """Target from uniform-n's seed-mean curve; per arm, cost-to-target mean/std over seeds.

    `reevals` (per arm, per seed) and `start_reevals` (per seed) are larger evaluations of the
    final and starting weights; with them the rows also compare final accuracy at that size."""
    uniform = [m for m in runs["uniform-n"] if m]
    xs, ys = seed_mean_curve(uniform)
    target = float(fit_saturating(xs, ys)(xs[-1]))
    final_uniform = np.array([eval_curve(m, "iteration")[1][-1] for m in uniform])
    mean_eval_uniform = _mean_after_start(uniform)
    rows = []
    for arm, seeds in runs.items():
        seeds = [m for m in seeds if m]
        row: dict = {"arm": arm, "seeds": len(seeds)}
        # With few seeds a seed's own curve often ends a little below the seed-mean target;
        # the seed-mean curve of each arm still gives a comparable reading.
        mean_iterations, mean_accuracy = seed_mean_curve(seeds)
        row["eval_iterations"] = mean_iterations.tolist()
        row["eval_accuracy_mean"] = mean_accuracy.tolist()
        mean_crossing = fitted_cost(mean_iterations, mean_accuracy, target)
        for axis, name in COSTS.items():
            costs = [cost_to_target(m, target, axis) for m in seeds]
            finite = [c for c in costs if math.isfinite(c)]
            row[f"{name}_to_target"] = (
                float(np.mean(finite)) if len(finite) == len(costs) else math.inf
            )
            row[f"{name}_to_target_std"] = (
                float(np.std(finite)) if len(finite) == len(costs) else math.nan
            )
            row[f"{name}_reached"] = f"{len(finite)}/{len(costs)}"
            row[f"{name}_to_target_of_mean"] = float(
                np.mean([cost_at_iteration(m, mean_crossing, axis) for m in seeds])
            )
            row[f"{name}_at_first_eval"] = float(
                np.mean([cost_at_iteration(m, mean_iterations[1], axis) for m in seeds])
            )
        iters = [r for m in seeds for r in m if r["iteration"] > 0]
        start, final = (
            np.array([eval_curve(m, "iteration")[1][i] for m in seeds]) for i in (0, -1)
        )
        row["start_eval_accuracy"] = float(start.mean())
        row["start_eval_std"] = float(start.std(ddof=1)) if len(start) > 1 else math.nan
        row["final_eval_accuracy"] = float(final.mean())
        row["accuracy_change"] = float((final - start).mean())
        row["accuracy_change_std"] = float((final - start).std())
        # Paired by seed against uniform-n: the final evaluation, and the mean of all evaluations
        # after the start (less noisy than one evaluation; rewards learning early).
        for name, values in (("final", final), ("mean_eval", _mean_after_start(seeds))):
            baseline = final_uniform if name == "final" else mean_eval_uniform
            if len(values) == len(baseline):
                diff, sem = paired_difference(values, baseline)
            else:
                diff, sem = math.nan, math.nan
            row[f"{name}_vs_uniform_n"], row[f"{name}_vs_uniform_n_sem"] = diff, sem
        if reevals:
            reeval = np.array(reevals[arm])
            row["reeval_accuracy"] = float(reeval.mean())
            row["reeval_change"] = float((reeval - np.array(start_reevals)).mean())
            diff, sem = paired_difference(reeval, reevals["uniform-n"])
            row["reeval_vs_uniform_n"], row["reeval_vs_uniform_n_sem"] = diff, sem
        row["optimizer_steps_per_iter"] = float(
            np.mean([r.get("optimizer_steps", 0) for r in iters])
        )
        row["trained_samples_per_iter"] = float(
            np.mean([r.get("trained_samples", 0) for r in iters])
        )
        row["accepted_samples_per_iter"] = float(
            np.mean([r.get("accepted_samples", 0) for r in iters])
        )
        row["generated_per_iter"] = float(
            np.mean([r.get("samples", 0) + r.get("presamples", 0) for r in iters])
        )
        row["zero_advantage_share"] = _mean(iters, "zero_advantage_share")
        row["alloc_zero_share"] = _mean(iters, "alloc_zero_share")
        row["alloc_max"] = _mean(iters, "alloc_max")
        row["corr_p_G"] = _mean(iters, "corr_accept_rate_grad_norm")
        total = sum(
            sum(v for k, v in r.items() if k.startswith("time_") and k != "time_eval")
            for r in iters
        )
        row["presample_time_share"] = (
            sum(r.get("time_presample", 0) for r in iters) / total if total else 0.0
        )
        row["gradnorm_time_share"] = (
            sum(r.get("time_stats", 0) for r in iters) / total if total else 0.0
        )
        rows.append(row)
    base_row = rows[0]
    for row in rows:
        for name in ("samples", "iterations"):
            a, b = base_row[f"{name}_to_target_of_mean"], row[f"{name}_to_target_of_mean"]
            row[f"{name}_speedup"] = (
                a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
            )
    return target, rows


COST_COLUMNS = [
    "reached",
    "iterations to target",
    "generated samples to target",
    "seconds to target",
]


def markdown_section(
    task: str,
    algorithm: str,
    target: float,
    rows: list[dict],
    command: str,
    reeval_size: str | None,
) -> str:
    """The BENCHMARKS.md section of one task and algorithm: the command, start and target, and
    one row per arm with its seed-mean curve, its paired differences from uniform-n in points
    (standard errors in brackets), its costs to the target and its allocation statistics."""
    uniform = rows[0]
    iterations = [int(i) for i in uniform["eval_iterations"]]
    first_eval = iterations[1]
    grpo = algorithm == "grpo"
    # A target at or below the start is "reached" before any training: costs to it mean nothing.
    has_target = target > uniform["start_eval_accuracy"]
    header = [
        "arm",
        f"eval @{'/'.join(map(str, iterations))} (mean of {uniform['seeds']})",
        "change (std)",
        "final vs uniform-n",
        f"mean {first_eval}-{iterations[-1]} vs uniform-n",
        *([f"{reeval_size} re-eval: final, change, vs uniform-n"] if reeval_size else []),
        *(COST_COLUMNS if has_target else []),
        "generated / iter",
        "correct / iter" if grpo else "accepted / iter",
        *(["zero-advantage share"] if grpo else []),
        "zero-share",
        "max n_i",
        "corr(p, G)",
        "pre-sample time",
        "grad-norm time",
    ]

    def versus(row: dict, key: str) -> str:
        return "0" if row is uniform else _points(row[key], row[f"{key}_sem"])

    def to_target(row: dict, name: str, digits: int) -> str:
        """The seed-mean curve's reading, then the seeds' own mean and spread if all reach it."""
        value = row[f"{name}_to_target_of_mean"]
        if not math.isfinite(value):
            return "-"
        if row["iterations_to_target_of_mean"] < first_eval:  # only "before the first eval"
            return f"< {row[f'{name}_at_first_eval']:.{digits}f}"
        per_seed = row[f"{name}_to_target"]
        spread = (
            f" (seeds {per_seed:.{digits}f} ± {row[f'{name}_to_target_std']:.{digits}f})"
            if math.isfinite(per_seed)
            else ""
        )
        return f"{value:.{digits}f}{spread}"

    def statistic(row: dict, key: str, spec: str) -> str:
        value = row[key]
        return "-" if value is None or math.isnan(value) else format(value, spec)

    lines = []
    for row in rows:
        cells = [
            row["arm"],
            " ".join(f"{a:.3f}".lstrip("0") for a in row["eval_accuracy_mean"]),
            f"{_points(row['accuracy_change'])} ({100 * row['accuracy_change_std']:.1f})",
            versus(row, "final_vs_uniform_n"),
            versus(row, "mean_eval_vs_uniform_n"),
        ]
        if reeval_size:
            cells.append(
                f"{row['reeval_accuracy']:.3f}".lstrip("0")
                + f", {_points(row['reeval_change'])}, {versus(row, 'reeval_vs_uniform_n')}"
            )
        if has_target:
            cells += [
                row["iterations_reached"],
                to_target(row, "iterations", 1),
                to_target(row, "samples", 0),
                to_target(row, "seconds", 0),
            ]
        cells += [
            f"{row['generated_per_iter']:.0f}",
            f"{row['accepted_samples_per_iter']:.0f}",
            *([statistic(row, "zero_advantage_share", ".2f")] if grpo else []),
            statistic(row, "alloc_zero_share", ".2f"),
            statistic(row, "alloc_max", ".0f"),
            statistic(row, "corr_p_G", ".2f"),
            f"{row['presample_time_share']:.0%}" if row["presample_time_share"] else "-",
            f"{row['gradnorm_time_share']:.0%}" if row["gradnorm_time_share"] else "-",
        ]
        lines.append(cells)
    table = "\n".join(
        "| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines]
    )
    note = (
        ""
        if has_target
        else "Uniform-n ended at or below its starting accuracy, so the costs to reach the "
        "target are left out; compare the changes.\n\n"
    )
    return (
        f"### {algorithm} on {task} ({uniform['seeds']} seeds)\n\n    {command}\n\n"
        f"Start {uniform['start_eval_accuracy']:.3f} (standard deviation over the seeds' "
        f"evaluations of the same weights: {100 * uniform['start_eval_std']:.1f} points), target "
        f"{target:.3f} (uniform-n's seed-mean fitted end).\n\n{note}{table}\n"
    )


def _points(value: float, sem: float | None = None) -> str:
    """A difference in accuracy as signed points, with its standard error in brackets."""
    text = f"{100 * value:+.1f}"
    return text if sem is None or math.isnan(sem) else f"{text} ({100 * sem:.1f})"


def _mean_after_start(seeds: list[list[dict]]) -> np.ndarray:
    """Per seed, the mean held-out accuracy over the evaluations after iteration 0."""
    return np.array([eval_curve(m, "iteration")[1][1:].mean() for m in seeds])


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--algorithms", nargs="+", default=["raft++", "grpo"], choices=list(ALGORITHMS)
    )
    parser.add_argument("--arms", nargs="+", default=list(BENCH_ARMS), choices=list(BENCH_ARMS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per iteration")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument(
        "--final-eval-samples",
        type=int,
        default=0,
        help="also re-evaluate each run's final weights (and the start) with this many fresh "
        "samples per held-out prompt; 0: off",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every run",
    )
    parser.add_argument("--output-dir", default="bench/results/convergence")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, uniform-n and gvm, 3 iterations"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.arms, args.iterations, args.eval_every, args.eval_prompts = (
            1,
            ["uniform-n", "gvm"],
            3,
            1,
            32,
        )
        args.tasks, args.algorithms, args.prompts = ["builtin"], ["raft++"], 8
    if "uniform-n" not in args.arms:
        parser.error("--arms must include uniform-n: it defines the target accuracy")
    args.arms = ["uniform-n"] + [a for a in args.arms if a != "uniform-n"]

    out = Path(args.output_dir)
    command = "python bench/convergence.py " + " ".join(sys.argv[1:])
    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "groups": []}
    sections = []
    for task in args.tasks:
        for algorithm in args.algorithms:
            runs: dict[str, list[list[dict]]] = {arm: [] for arm in args.arms}
            reevals: dict[str, list[float]] = {arm: [] for arm in args.arms}
            for arm in args.arms:
                for seed in range(args.seeds):
                    run_dir = out / "runs" / task / algorithm / arm / f"seed{seed}"
                    config = run_config(args, task, algorithm, arm, seed)
                    started = time.perf_counter()
                    train(config, run_dir)
                    seconds = time.perf_counter() - started
                    print(f"{task} {algorithm} {arm} seed {seed}: {seconds:.0f}s", file=sys.stderr)
                    runs[arm].append(load_run(run_dir))
                    if args.final_eval_samples:
                        reevals[arm].append(
                            reevaluate(
                                run_dir / "final",
                                config,
                                task,
                                args,
                                seed,
                                run_dir / "final-eval" / "results.json",
                            )
                        )
            start_reevals = [  # every arm starts from the same model
                reevaluate(
                    config.model,
                    config,
                    task,
                    args,
                    seed,
                    out / "runs" / task / f"start-eval-seed{seed}" / "results.json",
                )
                for seed in range(args.seeds)
                if args.final_eval_samples
            ]
            target, rows = summarise(runs, reevals if start_reevals else None, start_reevals)
            plot_curves(
                runs,
                out / f"curves-{task}-{algorithm}.png",
                target=target,
                title=f"{algorithm} on {task}: mean over {args.seeds} seeds, band = min..max",
            )
            results["groups"].append(
                {"task": task, "algorithm": algorithm, "target_accuracy": target, "rows": rows}
            )
            reeval_size = (
                f"{args.eval_prompts} x {args.final_eval_samples}" if start_reevals else None
            )
            sections.append(markdown_section(task, algorithm, target, rows, command, reeval_size))
            print(sections[-1])
    write_results(out, results, "Convergence: uniform vs GVM allocation", sections)


if __name__ == "__main__":
    main()
