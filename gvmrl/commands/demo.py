"""`gvmrl demo`: uniform vs GVM allocation for RAFT++ on the built-in task, over seeds, on a CPU.

Every arm of `gvmrl.experiments.DEMO_ARMS` trains from the shipped built-in checkpoint once per
seed; runs with the same seed share the prompt stream and the evaluation prompts, so arms are
compared paired by seed:
  uniform   n = 8 samples per prompt
  gvm       the paper's GVM: N' = 8 pre-samples per prompt (not trained on), then a budget of
            8 x prompts allocated by n_i ~ G_i / sqrt(p_i + alpha / p_i)

Per arm the table gives the generated samples (pre-samples included), the seed-mean final
held-out accuracy with its standard error, the difference to uniform paired by seed with its
standard error, and the generated samples at which the arm's seed-mean curve reaches uniform's
seed-mean final accuracy (`gvmrl.analysis.mean_curve_crossing`). One verdict sentence,
computed from these figures (`verdict`), closes it. Rerunning resumes unfinished runs and
skips finished ones.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from gvmrl.config import add_override_argument
from gvmrl.experiments import ARMS, DEMO_ARMS, builtin_run_overrides

# Defaults chosen by measurement: CPU seconds of one thread, RAFT++ on the built-in task, per
# iteration of 64 prompts about 10 (uniform) and 19 (gvm), per 128 x 4 evaluation about 4.5; so
# 3 seeds x 2 arms x 6 iterations with 4 evaluations each take about 10 CPU-minutes, about 6
# minutes of wall time on a 2-core CPU.
ITERATIONS = 6
PROMPTS = 64  # four mini-batches of 16 prompts: the update settings measured in BENCHMARKS.md
SEEDS = 3
EVAL_EVERY = 2
EVAL_PROMPTS = 128
EVAL_SAMPLES = 4
SAMPLES_PER_PROMPT = 8
# Generated-sample ratios within this of 1 count as "equal generated samples".
EQUAL_SAMPLES_TOLERANCE = 0.01


@dataclass(frozen=True)
class ArmSummary:
    """One arm's figures over its seeds; accuracies are fractions, differences to the baseline arm
    paired by seed."""

    arm: str
    seeds: list[int]
    samples_generated: float
    """Generated samples of a whole run, pre-samples included, mean over seeds."""
    final_accuracy: float
    """Held-out accuracy at the last iteration, mean over seeds."""
    final_accuracy_sem: float
    vs_baseline: float
    """Mean over seeds of (final accuracy - the baseline's final accuracy with the same seed)."""
    vs_baseline_sem: float
    iterations_to_target: float
    """Where the seed-mean curve reaches the baseline's seed-mean final accuracy (inf: not within
    the run)."""
    samples_to_target: float
    """Generated samples at that point, mean over seeds (inf: not within the run)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir", default="runs/demo", help="where the runs (ARM/seedS) and the summary go"
    )
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help="EM iterations per run")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per iteration")
    parser.add_argument(
        "--seeds",
        type=int,
        default=SEEDS,
        help="runs per arm, seeds 0..N-1 (a verdict needs at least 2: a paired standard error)",
    )
    add_override_argument(
        parser,
        help="extra config overrides applied to every run (see gvmrl train); e.g. "
        "eval.every, data.eval_limit, eval.samples, model=DIR",
    )


def demo_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [
        *builtin_run_overrides(
            algorithm="raft++",
            seed=seed,
            iterations=args.iterations,
            prompts=args.prompts,
            eval_every=EVAL_EVERY,
            eval_samples=EVAL_SAMPLES,
            eval_prompts=EVAL_PROMPTS,
        ),
        f"samples_per_prompt={SAMPLES_PER_PROMPT}",
        *args.overrides,
    ]


def run(args: argparse.Namespace) -> int:
    from gvmrl.analysis import load_run, plot_curves
    from gvmrl.config import ConfigError, load_config
    from gvmrl.io import InputError, json_ready, write_json, write_text
    from gvmrl.train import train

    if args.seeds < 1:
        raise InputError("--seeds", None, "must be >= 1")
    out = Path(args.output_dir)
    seeds = list(range(args.seeds))
    # Every config is checked before any work (a ConfigError: one line, exit 2, gvmrl.cli).
    configs = {
        (arm, seed): load_config(None, [*demo_overrides(args, seed), *ARMS[arm]])
        for seed in seeds
        for arm in DEMO_ARMS
    }
    for config in configs.values():  # a learning curve needs a start and an end
        for ok, key, message in (
            (config.iterations >= 1, "iterations", "the demo needs at least 1"),
            (config.eval.every >= 1, "eval.every", "the demo needs evaluations (>= 1)"),
            (config.eval_data is not None, "eval_data", "the demo needs held-out prompts"),
        ):
            if not ok:
                raise ConfigError(f"{key}: {message}")
    for (arm, seed), config in configs.items():  # seed by seed, so a stopped demo has pairs
        print(
            f"== {arm}, seed {seed}: RAFT++ with {config.allocation} allocation, "
            f"{config.iterations} iterations of {config.prompts_per_iteration} prompts",
            file=sys.stderr,
        )
        train(config, out / arm / f"seed{seed}")

    runs = {arm: [load_run(out / arm / f"seed{seed}") for seed in seeds] for arm in DEMO_ARMS}
    summaries = summarise(runs, seeds)
    sentence = verdict(summaries)
    config = configs[(DEMO_ARMS[0], 0)]
    settings = {
        "algorithm": config.algorithm,
        "iterations": config.iterations,
        "prompts_per_iteration": config.prompts_per_iteration,
        "eval_prompts": config.data.eval_limit or "all",
        "eval_samples": config.eval.samples,
        "eval_every": config.eval.every,
    }
    header = (
        f"RAFT++ on the built-in task: {config.iterations} iterations of "
        f"{config.prompts_per_iteration} prompts, {len(seeds)} seeds per arm; held-out accuracy "
        f"on {settings['eval_prompts']} test prompts x {config.eval.samples} samples.\n"
        f"Target: {summaries[0].arm}'s seed-mean final accuracy, "
        f"{summaries[0].final_accuracy:.3f}; to target: where an arm's seed-mean curve (fitted) "
        "reaches it (-: not within the run). (SE): standard error over seeds; differences to "
        f"{summaries[0].arm} are paired by seed.\n"
    )
    table = format_summary_table(summaries)
    write_json(
        out / "summary.json",
        json_ready(
            {
                "settings": settings,
                "target_accuracy": summaries[0].final_accuracy,
                "runs": [asdict(s) for s in summaries],
                "verdict": sentence,
            }
        ),
    )
    write_text(out / "summary.txt", f"{header}\n{table}\n\n{sentence}\n")
    plot_curves(
        runs,
        out / "curves.png",
        target=summaries[0].final_accuracy,
        title=f"RAFT++ on the built-in task: mean over {len(seeds)} seeds, band = min..max",
        axes=("iteration", "samples_generated"),
    )
    print(f"{header}\n{table}\n\n{sentence}")
    print(f"\nwrote {out / 'summary.json'}, {out / 'summary.txt'}, {out / 'curves.png'}")
    return 0


def summarise(runs: dict[str, list[list[dict]]], seeds: list[int]) -> list[ArmSummary]:
    """Per arm (the first is the baseline), its figures over `seeds` from the runs' metrics."""
    import numpy as np

    from gvmrl.analysis import (
        cost_at_iteration,
        eval_curve,
        mean_curve_crossing,
        paired_difference,
        seed_mean_curve,
    )

    finals = {
        arm: np.array([eval_curve(m, "iteration")[1][-1] for m in seed_runs])
        for arm, seed_runs in runs.items()
    }
    baseline = next(iter(runs))
    target = float(finals[baseline].mean())
    summaries = []
    for arm, seed_runs in runs.items():
        final = finals[arm]
        diff, diff_sem = paired_difference(final, finals[baseline])
        crossing = mean_curve_crossing(*seed_mean_curve(seed_runs), target)
        summaries.append(
            ArmSummary(
                arm=arm,
                seeds=list(seeds),
                samples_generated=float(np.mean([m[-1]["samples_generated"] for m in seed_runs])),
                final_accuracy=float(final.mean()),
                final_accuracy_sem=_sem(final),
                vs_baseline=diff,
                vs_baseline_sem=diff_sem,
                iterations_to_target=crossing,
                samples_to_target=float(
                    np.mean(
                        [cost_at_iteration(m, crossing, "samples_generated") for m in seed_runs]
                    )
                ),
            )
        )
    return summaries


def _sem(values) -> float:
    """Standard error of the mean over seeds (nan for one seed)."""
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def format_summary_table(summaries: list[ArmSummary]) -> str:
    from gvmrl.progress import format_table

    def with_sem(value: float, sem: float, sign: str = "") -> str:
        text = f"{100 * value:{sign}.1f}"
        return text if math.isnan(sem) else f"{text} ({100 * sem:.1f})"

    base = summaries[0].arm
    rows = [
        {
            "arm": s.arm,
            "generated samples": f"{s.samples_generated:.0f}",
            "final accuracy, % (SE)": with_sem(s.final_accuracy, s.final_accuracy_sem),
            f"vs {base}, points (SE)": (
                "-" if s.arm == base else with_sem(s.vs_baseline, s.vs_baseline_sem, "+")
            ),
            "iterations to target": (
                f"{s.iterations_to_target:.1f}" if math.isfinite(s.iterations_to_target) else "-"
            ),
            "samples to target": (
                f"{s.samples_to_target:.0f}" if math.isfinite(s.samples_to_target) else "-"
            ),
        }
        for s in summaries
    ]
    return format_table(rows, list(rows[0]))


def verdict(summaries: list[ArmSummary]) -> str:
    """One sentence comparing every arm with the first (the baseline), from their figures.

    A difference counts only beyond two standard errors of the paired difference; with one seed
    there is no standard error and no verdict. Where an arm generated a different number of
    samples, the sentence says how many, and how many it needed to reach the baseline's final
    accuracy."""
    base, *others = summaries
    clauses = [_verdict_clause(arm, base) for arm in others]
    sentence = "; ".join(clauses) if clauses else f"only {base.arm} ran: nothing to compare"
    return f"Verdict: {sentence}."


def _verdict_clause(arm: ArmSummary, base: ArmSummary) -> str:
    diff, sem, n = 100 * arm.vs_baseline, 100 * arm.vs_baseline_sem, len(arm.seeds)
    if n < 2 or not math.isfinite(sem):
        return (
            f"one seed cannot separate {arm.arm} from {base.arm} ({arm.arm} - {base.arm} = "
            f"{diff:+.1f} points, no standard error); run --seeds 3 or more"
        )
    figures = f"{arm.arm} - {base.arm} = {diff:+.1f} +- {sem:.1f} points, {n} seeds"
    if abs(diff) <= 2 * sem:
        head = f"no difference beyond two standard errors between {arm.arm} and {base.arm}"
    else:
        side = "ahead of" if diff > 0 else "behind"
        head = f"{arm.arm} {side} {base.arm} by {abs(diff):.1f} points"
    return f"{head} ({figures}), {_cost_phrase(arm, base)}"


def _cost_phrase(arm: ArmSummary, base: ArmSummary) -> str:
    ratio = arm.samples_generated / base.samples_generated
    if abs(ratio - 1) <= EQUAL_SAMPLES_TOLERANCE:
        return "at equal generated samples"
    spent = f"and {arm.arm} generated {ratio:.1f}x the samples"
    if not math.isfinite(arm.samples_to_target):
        return f"{spent} without reaching {base.arm}'s final accuracy"
    if base.samples_to_target == 0:  # the baseline ended where every run started
        return f"{spent}, while {base.arm} ended no higher than it started"
    to_target = arm.samples_to_target / base.samples_to_target
    return f"{spent}, reaching {base.arm}'s final accuracy with {to_target:.1f}x its samples"
